"""Signal indexes: exact and HNSW cosine, PDQ Hamming, removal, serialization, GPU selection."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moderation.banks.index.cosine as cosine_module
import moderation.banks.index.cosine_params as cosine_params
import moderation.banks.index.hamming as hamming_module
from moderation.banks.index import (
    HNSW_EF_SEARCH,
    TOMBSTONE_COMPACT_FRACTION,
    CosineIndex,
    HammingIndex,
    Hit,
    SignalIndex,
    load_index,
    maybe_to_gpu,
)
from moderation.signals.pdq import hamming_distances

# Tolerance between FAISS float32 scores and a float64 numpy reference.
SCORE_TOL = 1e-5


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(10**12, size=n, replace=False).astype(np.int64)


def assert_cosine_hits(
    hits: list[Hit], scores: np.ndarray, ids: np.ndarray, k: int, threshold: float
) -> None:
    """``hits`` is what exact search must return, up to float32 rounding at the boundaries.

    ``scores`` are float64 cosines of one query against every entry ``ids``.
    """
    by_id = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    got = [h.id for h in hits]
    assert len(set(got)) == len(got)
    for hit in hits:
        assert hit.score == pytest.approx(by_id[hit.id], abs=SCORE_TOL)
        assert hit.score >= threshold
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    sure = int((scores >= threshold + SCORE_TOL).sum())
    possible = int((scores >= threshold - SCORE_TOL).sum())
    assert min(k, sure) <= len(hits) <= min(k, possible)
    floor = hits[-1].score if len(hits) == k else threshold
    missed = [i for i, s in by_id.items() if i not in got and s > floor + SCORE_TOL]
    assert not missed, missed


def hamming_reference(
    query: np.ndarray, digests: np.ndarray, ids: np.ndarray, k: int, threshold: float
) -> list[tuple[int, float]]:
    distances = hamming_distances(query, digests)
    keep = distances <= threshold
    order = np.lexsort((ids[keep], distances[keep]))[:k]
    return [(int(ids[keep][j]), float(distances[keep][j])) for j in order]


def pairs(hits: list[Hit]) -> list[tuple[int, float]]:
    return [(h.id, h.score) for h in hits]


def flip_bits(rng: np.random.Generator, digest: np.ndarray, count: int) -> np.ndarray:
    bits = np.unpackbits(digest)
    positions = rng.choice(256, size=count, replace=False)
    bits[positions] ^= 1
    return np.packbits(bits)


# --- cosine: exact search -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 48])
def test_flat_cosine_equals_brute_force(dim: int) -> None:
    rng = np.random.default_rng(dim)
    vectors = unit_vectors(rng, 700, dim)
    ids = random_ids(rng, 700)
    index = CosineIndex.build(ids, vectors)
    assert index.algorithm == "flat"
    assert len(index) == 700
    # Half the queries are perturbed bank entries, so high thresholds still have hits.
    queries = np.concatenate([unit_vectors(rng, 20, dim), vectors[:20]])
    queries[20:] += 0.2 * unit_vectors(rng, 20, dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    reference = queries.astype(np.float64) @ vectors.astype(np.float64).T
    for k in (1, 5, 50, 1000):
        for threshold in (-1.0, 0.0, 0.3, 0.9):
            results = index.search(queries, k, threshold)
            assert len(results) == len(queries)
            for hits, scores in zip(results, reference, strict=True):
                assert_cosine_hits(hits, scores, ids, k, threshold)


def test_cosine_ties_are_ordered_by_id() -> None:
    vector = unit_vectors(np.random.default_rng(0), 1, 16)
    index = CosineIndex.build(np.array([30, 10, 20]), np.repeat(vector, 3, axis=0))
    assert [h.id for h in index.search(vector, 3, 0.5)[0]] == [10, 20, 30]


def test_auto_algorithm_switches_at_the_size_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cosine_module, "HNSW_MIN_ENTRIES", 100)
    rng = np.random.default_rng(1)
    small = CosineIndex.build(np.arange(99), unit_vectors(rng, 99, 8))
    large = CosineIndex.build(np.arange(100), unit_vectors(rng, 100, 8))
    assert small.params == {"algorithm": "flat"}
    assert large.algorithm == "hnsw"
    assert large.params == {
        "algorithm": "hnsw",
        "hnsw_m": cosine_params.HNSW_M,
        "ef_construction": cosine_params.HNSW_EF_CONSTRUCTION,
        "ef_search": HNSW_EF_SEARCH,
    }


# --- cosine: HNSW ---------------------------------------------------------------------------


def test_hnsw_recall_at_10_against_exact() -> None:
    rng = np.random.default_rng(20_000)
    vectors = unit_vectors(rng, 20_000, 64)
    ids = random_ids(rng, 20_000)
    queries = unit_vectors(rng, 200, 64)
    exact = CosineIndex.build(ids, vectors, algorithm="flat").search(queries, 10, -1.0)
    approx = CosineIndex.build(ids, vectors, algorithm="hnsw").search(queries, 10, -1.0)
    recall = np.mean(
        [
            len({h.id for h in a} & {h.id for h in e}) / 10
            for a, e in zip(approx, exact, strict=True)
        ]
    )
    assert recall >= 0.95


def test_hnsw_small_bank_search_is_exact() -> None:
    # efSearch (128) exceeds the bank, so the graph search visits every entry.
    rng = np.random.default_rng(3)
    vectors = unit_vectors(rng, 100, 16)
    ids = random_ids(rng, 100)
    index = CosineIndex.build(ids, vectors, algorithm="hnsw")
    queries = unit_vectors(rng, 10, 16)
    reference = queries.astype(np.float64) @ vectors.astype(np.float64).T
    for hits, scores in zip(index.search(queries, 7, 0.1), reference, strict=True):
        assert_cosine_hits(hits, scores, ids, 7, 0.1)


# --- removal --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["flat", "hnsw"])
def test_removed_cosine_entries_are_never_returned(algorithm: str) -> None:
    rng = np.random.default_rng(4)
    vectors = unit_vectors(rng, 400, 16)
    ids = np.arange(1000, 1400)
    index = CosineIndex.build(ids, vectors, algorithm=algorithm)  # type: ignore[arg-type]
    removed = ids[::10]  # 10%: below the compaction fraction, so HNSW keeps tombstones
    assert index.remove([*removed.tolist(), 5, int(removed[0])]) == removed.size
    assert index.remove(removed.tolist()) == 0
    assert len(index) == 360
    assert index.tombstones == (removed.size if algorithm == "hnsw" else 0)
    results = index.search(vectors, 400, -1.0)
    returned = {h.id for hits in results for h in hits}
    assert returned.isdisjoint(removed.tolist())
    assert returned == set(ids.tolist()) - set(removed.tolist())
    # Each remaining entry is still its own nearest neighbour.
    for row, hits in zip(range(400), results, strict=True):
        if ids[row] not in removed:
            assert hits[0].id == ids[row]


def test_hnsw_compacts_when_tombstones_pile_up() -> None:
    rng = np.random.default_rng(5)
    vectors = unit_vectors(rng, 200, 16)
    ids = np.arange(200)
    index = CosineIndex.build(ids, vectors, algorithm="hnsw")
    index.remove(range(0, 200, 10))
    index.remove(range(1, 200, 10))
    assert index.tombstones == 40  # exactly the compaction fraction: not yet over it
    assert TOMBSTONE_COMPACT_FRACTION * 200 == 40
    index.remove(range(2, 200, 10))
    assert index.tombstones == 0
    assert len(index) == 140
    survivors = [i for i in range(200) if i % 10 > 2]
    hits = index.search(vectors[survivors], 1, 0.99)
    assert [h[0].id for h in hits] == survivors
    returned = {h.id for row in index.search(vectors, 200, -1.0) for h in row}
    assert returned == set(survivors)


def test_hnsw_readding_a_removed_id_forgets_its_old_vector() -> None:
    rng = np.random.default_rng(6)
    vectors = unit_vectors(rng, 300, 16)
    index = CosineIndex.build(np.arange(300), vectors, algorithm="hnsw")
    index.remove([7])
    replacement = unit_vectors(rng, 1, 16)
    index.add(np.array([7]), replacement)
    assert index.tombstones == 0
    old_hits = index.search(vectors[7:8], 300, -1.0)[0]
    assert [h.id for h in old_hits].count(7) == 1
    assert index.search(replacement, 1, 0.99)[0][0].id == 7


def test_removed_hamming_entries_are_never_returned() -> None:
    rng = np.random.default_rng(7)
    digests = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
    ids = np.arange(300) * 7
    index = HammingIndex.build(ids, digests)
    removed = ids[rng.choice(300, size=60, replace=False)]
    assert index.remove(iter(removed.tolist())) == 60
    assert len(index) == 240
    results = index.search(digests, 300, 256)
    returned = {h.id for hits in results for h in hits}
    assert returned == set(ids.tolist()) - set(removed.tolist())


def test_remove_rejects_non_integers() -> None:
    index = HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8))
    for bad in (["1"], [1.0], [True], [2**64]):
        with pytest.raises(ValueError, match="ids"):
            index.remove(bad)  # type: ignore[arg-type]


# --- Hamming --------------------------------------------------------------------------------


def test_hamming_equals_brute_force_on_random_digests() -> None:
    rng = np.random.default_rng(8)
    digests = rng.integers(0, 256, size=(2000, 32), dtype=np.uint8)
    ids = random_ids(rng, 2000)
    index = HammingIndex.build(ids, digests)
    queries = rng.integers(0, 256, size=(30, 32), dtype=np.uint8)
    for k in (1, 10, 3000):
        for threshold in (0, 31, 100, 110.5, 256):
            results = index.search(queries, k, threshold)
            for query, hits in zip(queries, results, strict=True):
                expected = hamming_reference(query, digests, ids, k, threshold)
                assert pairs(hits) == expected


def test_hamming_finds_near_duplicates_within_the_pdq_threshold() -> None:
    rng = np.random.default_rng(9)
    digests = rng.integers(0, 256, size=(1000, 32), dtype=np.uint8)
    ids = np.arange(1000) + 500
    index = HammingIndex.build(ids, digests)
    flips = [0, 1, 5, 16, 31, 32, 40]
    queries = np.stack([flip_bits(rng, digests[i], n) for i, n in enumerate(flips)])
    results = index.search(queries, 5, 31)
    for row, (count, hits) in enumerate(zip(flips, results, strict=True)):
        if count <= 31:
            assert hits[0] == Hit(int(ids[row]), float(count))
        else:
            assert int(ids[row]) not in {h.id for h in hits}
        assert pairs(hits) == hamming_reference(queries[row], digests, ids, 5, 31)


def test_hamming_ties_keep_every_equal_entry_in_id_order() -> None:
    digest = np.zeros((1, 32), np.uint8)
    index = HammingIndex.build(np.array([9, 3, 6, 1]), np.repeat(digest, 4, axis=0))
    assert [h.id for h in index.search(digest, 3, 0)[0]] == [1, 3, 6]


hamming_ops = st.lists(
    st.tuples(st.booleans(), st.lists(st.integers(0, 40), min_size=1, max_size=8, unique=True)),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=hamming_ops, seed=st.integers(0, 2**32 - 1), k=st.integers(1, 50))
def test_hamming_add_remove_sequences_match_a_dict_model(
    ops: list[tuple[bool, list[int]]], seed: int, k: int
) -> None:
    rng = np.random.default_rng(seed)
    index = HammingIndex.build(np.empty(0, np.int64), np.empty((0, 32), np.uint8))
    model: dict[int, np.ndarray] = {}
    for is_add, id_list in ops:
        if is_add:
            fresh = [i for i in id_list if i not in model]
            base = rng.integers(0, 256, size=32, dtype=np.uint8)
            rows = [flip_bits(rng, base, int(rng.integers(0, 40))) for _ in fresh]
            index.add(np.array(fresh, dtype=np.int64), np.array(rows, np.uint8).reshape(-1, 32))
            model.update(zip(fresh, rows, strict=True))
        else:
            assert index.remove(id_list) == sum(i in model for i in id_list)
            for i in id_list:
                model.pop(i, None)
    assert index.ids().tolist() == sorted(model)
    query = rng.integers(0, 256, size=(1, 32), dtype=np.uint8)
    if model:
        ids = np.array(list(model), dtype=np.int64)
        digests = np.stack(list(model.values()))
        query = flip_bits(rng, digests[0], 3).reshape(1, 32)
        expected = hamming_reference(query[0], digests, ids, k, 120)
    else:
        expected = []
    assert pairs(index.search(query, k, 120)[0]) == expected


# --- Hamming: multi-index hashing -----------------------------------------------------------

# Thresholds the property test compares: every radius multi-index hashing covers with one flip
# (0-31, the PDQ threshold), the edges of two flips, and 52, which needs three and scans.
MIH_THRESHOLDS = [*range(32), 32, 40, 47, 47.5, 48, 52, 256]


def planted_bank(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random digests with near neighbours of a few queries at every distance 0..40.

    Returns ids, digests and queries (``uint8 (q, 32)``).
    """
    base = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(6, 32), dtype=np.uint8)
    planted = [flip_bits(rng, q, d) for q in queries for d in range(41)]
    digests = np.concatenate([base, np.stack(planted), queries[:2]])  # two exact copies
    ids = random_ids(rng, len(digests))
    return ids, digests, queries


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    nhash=st.sampled_from([8, 16, 32]),
    k=st.sampled_from([1, 3, 1000]),
    removals=st.integers(0, 120),
)
def test_mih_returns_exactly_what_the_flat_scan_returns(
    seed: int, n: int, nhash: int, k: int, removals: int
) -> None:
    rng = np.random.default_rng(seed)
    ids, digests, queries = planted_bank(rng, n)
    flat = HammingIndex.build(ids, digests, algorithm="flat")
    mih = HammingIndex.build(ids, digests, algorithm="mih", nhash=nhash)
    gone = rng.choice(ids, size=min(removals, len(ids)), replace=False).tolist()
    assert mih.remove(gone) == flat.remove(gone) == len(gone)
    # Re-adding a removed id under a new digest must forget the old one.
    readd = np.array(gone[:3], dtype=np.int64)
    fresh = np.array([flip_bits(rng, queries[0], 5 + i) for i in range(len(readd))], np.uint8)
    flat.add(readd, fresh.reshape(-1, 32))
    mih.add(readd, fresh.reshape(-1, 32))
    assert mih.ids().tolist() == flat.ids().tolist()
    for threshold in MIH_THRESHOLDS:
        assert mih.search(queries, k, threshold) == flat.search(queries, k, threshold)


def test_mih_finds_every_planted_neighbour_up_to_31_bits() -> None:
    rng = np.random.default_rng(20)
    digests = rng.integers(0, 256, size=(5000, 32), dtype=np.uint8)
    query = digests[0]
    near = np.stack([flip_bits(rng, query, d) for d in range(32) for _ in range(3)])
    ids = np.arange(len(digests) + len(near))
    index = HammingIndex.build(ids, np.concatenate([digests, near]), algorithm="mih")
    hits = index.search(query.reshape(1, 32), 1000, 31)[0]
    assert pairs(hits) == hamming_reference(query, np.concatenate([digests, near]), ids, 1000, 31)
    assert {h.id for h in hits} >= set(range(5000, len(ids)))


def test_mih_serialization_is_deterministic_for_a_build() -> None:
    rng = np.random.default_rng(23)
    ids, digests, _ = planted_bank(rng, 300)
    first = HammingIndex.build(ids, digests, algorithm="mih").serialize()
    assert HammingIndex.build(ids, digests, algorithm="mih").serialize() == first


def test_mih_compacts_after_many_removals_and_keeps_results() -> None:
    rng = np.random.default_rng(21)
    ids, digests, queries = planted_bank(rng, 500)
    index = HammingIndex.build(ids, digests, algorithm="mih")
    flat = HammingIndex.build(ids, digests, algorithm="flat")
    stored = index._mih.ntotal
    gone = ids[: len(ids) // 4].tolist()
    index.remove(gone)
    flat.remove(gone)
    assert index._mih.ntotal == len(index) < stored  # rebuilt without the dead entries
    assert index._dead == 0
    for threshold in (0, 31, 52):
        assert index.search(queries, 50, threshold) == flat.search(queries, 50, threshold)
    assert HammingIndex.deserialize(index.serialize()).search(queries, 50, 31) == flat.search(
        queries, 50, 31
    )


def test_auto_uses_mih_from_the_size_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hamming_module, "MIH_MIN_ENTRIES", 100)
    rng = np.random.default_rng(22)
    digests = rng.integers(0, 256, size=(100, 32), dtype=np.uint8)
    assert HammingIndex.build(np.arange(99), digests[:99]).algorithm == "flat"
    big = HammingIndex.build(np.arange(100), digests)
    assert big.algorithm == "mih"
    assert big.params == {"algorithm": "mih", "bits": 256, "nhash": 16}
    assert HammingIndex.build(np.arange(100), digests, algorithm="flat").algorithm == "flat"


def test_flat_hamming_written_before_algorithm_was_recorded_still_loads() -> None:
    index = _hamming()
    header, body = _split(index.serialize())
    assert header["params"] == {"algorithm": "flat", "bits": 256}
    header["params"] = {"bits": 256}
    restored = load_index(_join(header, body))
    assert isinstance(restored, HammingIndex)
    assert restored.algorithm == "flat"
    assert restored.ids().tolist() == index.ids().tolist()
    queries = _queries_for(index)
    assert restored.search(queries, 20, 120) == index.search(queries, 20, 120)


# --- serialization --------------------------------------------------------------------------


def _cosine_flat() -> CosineIndex:
    rng = np.random.default_rng(10)
    index = CosineIndex.build(random_ids(rng, 300), unit_vectors(rng, 300, 12), algorithm="flat")
    index.remove(index.ids()[:5].tolist())
    return index


def _cosine_hnsw() -> CosineIndex:
    rng = np.random.default_rng(11)
    index = CosineIndex.build(random_ids(rng, 300), unit_vectors(rng, 300, 12), algorithm="hnsw")
    index.remove(index.ids()[:5].tolist())  # tombstones must survive the round trip
    return index


def _hamming() -> HammingIndex:
    rng = np.random.default_rng(12)
    index = HammingIndex.build(random_ids(rng, 300), rng.integers(0, 256, (300, 32), np.uint8))
    index.remove(index.ids()[:5].tolist())
    return index


def _queries_for(index: SignalIndex, n: int = 25) -> np.ndarray:
    rng = np.random.default_rng(13)
    if isinstance(index, HammingIndex):
        return rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    return unit_vectors(rng, n, index.dim)


def _hamming_mih() -> HammingIndex:
    rng = np.random.default_rng(12)
    index = HammingIndex.build(
        random_ids(rng, 300), rng.integers(0, 256, (300, 32), np.uint8), algorithm="mih"
    )
    index.remove(index.ids()[:5].tolist())  # dead entries must survive the round trip
    return index


INDEX_FACTORIES: dict[str, Callable[[], SignalIndex]] = {
    "cosine-flat": _cosine_flat,
    "cosine-hnsw": _cosine_hnsw,
    "hamming": _hamming,
    "hamming-mih": _hamming_mih,
}


@pytest.mark.parametrize("factory", INDEX_FACTORIES.values(), ids=INDEX_FACTORIES.keys())
def test_serialize_round_trip_gives_identical_results(factory: Callable[[], SignalIndex]) -> None:
    index = factory()
    queries = _queries_for(index)
    threshold = 120.0 if isinstance(index, HammingIndex) else 0.0
    before = index.search(queries, 20, threshold)
    data = index.serialize()
    header, _ = _split(data)
    assert data.startswith(b"MODSIGIX")
    assert header["format_version"] == 1
    assert (header["type"], header["dim"], header["count"]) == (index.kind, index.dim, len(index))
    assert header["params"] == index.params
    for restored in (type(index).deserialize(data), load_index(data)):
        assert type(restored) is type(index)
        assert len(restored) == len(index)
        assert restored.ids().tolist() == index.ids().tolist()
        assert restored.params == index.params
        assert restored.dim == index.dim
        assert restored.search(queries, 20, threshold) == before
        if isinstance(index, HammingIndex) and index.algorithm == "mih":
            # FAISS writes hash tables in hash-map order, which a reload does not keep;
            # the bytes differ but read back to the same index.
            assert load_index(restored.serialize()).search(queries, 20, threshold) == before
        else:
            assert restored.serialize() == data


def test_round_trip_keeps_hnsw_tombstones_and_ef_search() -> None:
    rng = np.random.default_rng(16)
    vectors = unit_vectors(rng, 200, 12)
    index = CosineIndex.build(np.arange(200), vectors, algorithm="hnsw", ef_search=40)
    index.remove([3, 50, 150])
    restored = CosineIndex.deserialize(index.serialize())
    assert restored.tombstones == 3
    assert restored.params["ef_search"] == 40
    assert faiss.downcast_index(restored._index.index).hnsw.efSearch == 40  # type: ignore[attr-defined]
    returned = {h.id for hits in restored.search(vectors, 200, -1.0) for h in hits}
    assert returned == set(range(200)) - {3, 50, 150}


def test_restored_index_accepts_further_changes() -> None:
    index = HammingIndex.deserialize(_hamming().serialize())
    index.add(np.array([1]), np.full((1, 32), 255, np.uint8))
    assert index.search(np.full((1, 32), 255, np.uint8), 1, 0)[0] == [Hit(1, 0.0)]
    assert index.remove([1]) == 1


def test_empty_index_searches_and_round_trips() -> None:
    for index in (
        CosineIndex.build(np.empty(0, np.int64), np.empty((0, 24), np.float32)),
        HammingIndex.build(np.empty(0, np.int64), np.empty((0, 32), np.uint8)),
    ):
        queries = _queries_for(index, 3)
        assert len(index) == 0
        assert index.search(queries, 5, 0.0) == [[], [], []]
        restored = load_index(index.serialize())
        assert len(restored) == 0
        assert restored.search(queries, 5, 0.0) == [[], [], []]


def test_loading_the_wrong_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="hamming"):
        CosineIndex.deserialize(_hamming().serialize())
    with pytest.raises(ValueError, match="cosine"):
        HammingIndex.deserialize(_cosine_flat().serialize())


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12 : 12 + length]), data[12 + length :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return b"MODSIGIX" + struct.pack(">I", len(encoded)) + encoded + body


def _with_header(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    header, body = _split(data)
    change(header)
    return _join(header, body)


def _with_faiss_section(header: dict[str, Any], blob: bytes) -> bytes:
    header["sections"] = [
        {"name": "faiss", "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    ]
    return _join(header, blob)


def _malformed_cases() -> dict[str, bytes]:
    valid = _cosine_hnsw().serialize()
    _, body = _split(valid)
    cases = {
        "empty": b"",
        "magic only": b"MODSIGIX",
        "wrong magic": b"XODSIGIX" + valid[8:],
        "pickle": b"\x80\x04\x95" + valid,
        "header length too big": valid[:8] + struct.pack(">I", 10**6) + valid[12:],
        "header not json": valid[:12] + b"{" * (len(valid) - 12),
        "header is a list": _join([], body),  # type: ignore[arg-type]
        "truncated in header": valid[:20],
        "truncated in faiss": valid[: len(valid) // 2],
        "truncated by one": valid[:-1],
        "trailing byte": valid + b"\x00",
        "flipped faiss byte": valid[:-100] + bytes([valid[-100] ^ 1]) + valid[-99:],
    }
    mutations: dict[str, Callable[[dict[str, Any]], None]] = {
        "future version": lambda h: h.update(format_version=2),
        "unknown type": lambda h: h.update(type="md5"),
        "empty header": lambda h: h.clear(),
        "wrong count": lambda h: h.update(count=h["count"] + 1),
        "wrong dim": lambda h: h.update(dim=h["dim"] + 1),
        "string dim": lambda h: h.update(dim="12"),
        "bool count": lambda h: h.update(count=True),
        "wrong hnsw_m": lambda h: h["params"].update(hnsw_m=16),
        "bad ef_search": lambda h: h["params"].update(ef_search=0),
        "unknown param": lambda h: h["params"].update(colour="red"),
        "unknown algorithm": lambda h: h["params"].update(algorithm="ivf"),
        "missing tombstones": lambda h: h.update(sections=h["sections"][:1]),
        "sections not a list": lambda h: h.update(sections={}),
        "section bad sha": lambda h: h["sections"][0].update(sha256="0" * 64),
        "section negative length": lambda h: h["sections"][0].update(length=-1),
    }
    for name, change in mutations.items():
        cases[name] = _with_header(valid, change)
    flat_header, _ = _split(_cosine_flat().serialize())
    cases["binary index under a cosine header"] = _with_faiss_section(
        flat_header, faiss.serialize_index_binary(_hamming()._index).tobytes()
    )
    cases["bare IndexFlatIP"] = _with_faiss_section(
        dict(flat_header, count=0), faiss.serialize_index(faiss.IndexFlatIP(12)).tobytes()
    )
    cases["L2 metric"] = _with_faiss_section(
        dict(flat_header, count=0),
        faiss.serialize_index(faiss.IndexIDMap(faiss.IndexFlatL2(12))).tobytes(),
    )
    return cases


MALFORMED = _malformed_cases()


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("reader", [load_index, CosineIndex.deserialize], ids=["any", "cosine"])
def test_malformed_bytes_are_refused(name: str, reader: Callable[[bytes], SignalIndex]) -> None:
    with pytest.raises(ValueError):
        reader(MALFORMED[name])


def _hamming_malformed() -> dict[str, bytes]:
    valid = _hamming_mih().serialize()
    header, body = _split(valid)
    labels = next(s for s in header["sections"] if s["name"] == "labels")
    mutations: dict[str, Callable[[dict[str, Any]], None]] = {
        "unknown algorithm": lambda h: h["params"].update(algorithm="lsh"),
        "no algorithm": lambda h: h["params"].pop("algorithm"),
        "list algorithm": lambda h: h["params"].update(algorithm=["mih"]),
        "wrong nhash": lambda h: h["params"].update(nhash=8),
        "bad nhash": lambda h: h["params"].update(nhash=12),
        "string nhash": lambda h: h["params"].update(nhash="16"),
        "no nhash": lambda h: h["params"].pop("nhash"),
        "flat with nhash": lambda h: h["params"].update(algorithm="flat"),
        "unknown param": lambda h: h["params"].update(colour="red"),
        "wrong count": lambda h: h.update(count=h["count"] + 1),
        "missing labels": lambda h: h.update(sections=h["sections"][:1]),
    }
    cases = {name: _with_header(valid, change) for name, change in mutations.items()}
    flat_header, _ = _split(_hamming().serialize())
    cases["multi-hash under a flat header"] = _with_faiss_section(
        dict(flat_header, count=len(_hamming_mih())),
        faiss.serialize_index_binary(_hamming_mih()._mih).tobytes(),
    )
    short = dict(header)
    short["sections"] = [
        s if s["name"] != "labels" else dict(labels, length=0) for s in header["sections"]
    ]
    short_body = body[: len(body) - labels["length"]]
    short["sections"][1]["sha256"] = hashlib.sha256(b"").hexdigest()
    cases["empty labels"] = _join(short, short_body)
    return cases


HAMMING_MALFORMED = _hamming_malformed()


@pytest.mark.parametrize("name", sorted(HAMMING_MALFORMED))
def test_malformed_hamming_bytes_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        load_index(HAMMING_MALFORMED[name])


def test_non_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="bytes"):
        load_index("MODSIGIX")  # type: ignore[arg-type]


VALID_BLOBS = {name: factory().serialize() for name, factory in INDEX_FACTORIES.items()}


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(VALID_BLOBS)),
    position=st.integers(0, 10**7),
    value=st.integers(0, 255),
)
def test_single_byte_corruption_is_refused_or_harmless(
    name: str, position: int, value: int
) -> None:
    valid = VALID_BLOBS[name]
    position %= len(valid)
    data = valid[:position] + bytes([value]) + valid[position + 1 :]
    try:
        restored = load_index(data)
    except ValueError:
        return
    # Only a change inside the JSON header to another valid value (an HNSW parameter, say)
    # can pass; the entries themselves are covered by the checksums and never change.
    assert position < 12 + struct.unpack(">I", valid[8:12])[0] or data == valid
    assert restored.ids().tolist() == load_index(valid).ids().tolist()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        load_index(data)


# --- input validation -----------------------------------------------------------------------

RNG = np.random.default_rng(14)
GOOD = unit_vectors(RNG, 3, 8)


@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        (np.arange(3), GOOD.astype(np.float64), "dtype float32"),
        (np.arange(3), GOOD.astype(np.float16), "dtype float32"),
        (np.arange(3), GOOD[0], "2-D"),
        (np.arange(3), GOOD[:, :, None], "2-D"),
        (np.arange(3), np.where(np.eye(3, 8, dtype=bool), np.nan, GOOD), "non-finite"),
        (np.arange(3), np.where(np.eye(3, 8, dtype=bool), np.inf, GOOD), "non-finite"),
        (np.arange(3), GOOD * 2, "L2-normalised"),
        (np.arange(3), np.zeros((3, 8), np.float32), "L2-normalised"),
        (np.arange(2), GOOD, "2 ids for 3"),
        (np.arange(3.0), GOOD, "integers"),
        (np.array([True, False, True]), GOOD, "integers"),
        (np.array(["a", "b", "c"]), GOOD, "integers"),
        (np.array([1, -1, 2]), GOOD, "non-negative"),
        (np.array([1, 1, 2]), GOOD, "distinct"),
        (np.array([2**64 - 1, 1, 2], dtype=np.uint64), GOOD, "int64"),
        (np.arange(3).reshape(3, 1), GOOD, "1-D"),
    ],
)
def test_cosine_build_validates_input(ids: Any, vectors: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CosineIndex.build(ids, vectors)


def test_cosine_add_and_search_validate_against_the_index() -> None:
    index = CosineIndex.build(np.arange(3), GOOD)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.array([5, 2]), unit_vectors(RNG, 2, 8))
    assert len(index) == 3  # nothing was added
    with pytest.raises(ValueError, match="8 columns"):
        index.add(np.array([7]), unit_vectors(RNG, 1, 9))
    with pytest.raises(ValueError, match="8 columns"):
        index.search(unit_vectors(RNG, 1, 9), 1, 0.5)
    with pytest.raises(ValueError, match="reshape"):
        index.search(GOOD[0], 1, 0.5)
    with pytest.raises(ValueError, match="L2-normalised"):
        index.search(GOOD * 3, 1, 0.5)
    for k in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k must"):
            index.search(GOOD, k, 0.5)  # type: ignore[arg-type]
    for threshold in (1.5, -1.01, float("nan"), float("inf"), "0.5", None):
        with pytest.raises(ValueError, match="threshold"):
            index.search(GOOD, 1, threshold)  # type: ignore[arg-type]


def test_unit_norm_tolerance_admits_rounding() -> None:
    vectors = (GOOD * (1 + 5e-4)).astype(np.float32)
    index = CosineIndex.build(np.arange(3), vectors)
    assert index.search(vectors, 1, 0.99)[0][0].id == 0


@pytest.mark.parametrize(
    "params",
    [{"colour": "red"}, {"algorithm": "ivf"}, {"hnsw_m": 0}, {"ef_search": -3}, {"hnsw_m": 2.5}],
)
def test_cosine_build_rejects_bad_parameters(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CosineIndex.build(np.arange(3), GOOD, **params)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.zeros((2, 32), np.int8), "uint8"),
        (np.zeros((2, 32), np.float32), "uint8"),
        (np.zeros((2, 31), np.uint8), "32 columns"),
        (np.zeros(32, np.uint8), "2-D"),
    ],
)
def test_hamming_validates_digests(vectors: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HammingIndex.build(np.arange(len(vectors)), vectors)


def test_hamming_validates_search_arguments() -> None:
    index = HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        index.search(np.zeros((1, 32), np.uint8), 1, -1)
    with pytest.raises(ValueError, match="threshold"):
        index.search(np.zeros((1, 32), np.uint8), 1, 257)
    with pytest.raises(ValueError, match="k must"):
        index.search(np.zeros((1, 32), np.uint8), 0, 31)
    with pytest.raises(ValueError, match="unknown HammingIndex parameter"):
        HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8), bits=64)
    with pytest.raises(ValueError, match="algorithm"):
        HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8), algorithm="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nhash"):
        HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8), algorithm="mih", nhash=12)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.array([1]), np.zeros((1, 32), np.uint8))


def test_membership() -> None:
    index = HammingIndex.build(np.array([4, 8]), np.zeros((2, 32), np.uint8))
    assert 4 in index and np.int64(8) in index
    assert 5 not in index and "4" not in index and True not in index


# --- GPU selection (no GPU here: FAISS GPU symbols are stand-ins) ----------------------------


class FakeGpuIndex:
    """Stands in for a FAISS GPU index: delegates to the CPU index and counts searches."""

    def __init__(self, cpu: faiss.Index) -> None:
        self.cpu = cpu
        self.searches = 0
        self.ntotal = cpu.ntotal

    def search(self, x: np.ndarray, k: int, **kwargs: Any) -> Any:
        self.searches += 1
        return self.cpu.search(x, k, **kwargs)


class FakeGpuFaiss:
    """Installs the FAISS GPU entry points ``maybe_to_gpu`` looks up, recording their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, visible_gpus: int) -> None:
        self.single: list[int] = []
        self.sharded: list[int] = []
        self.made: list[FakeGpuIndex] = []
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self._to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self._to_all, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: visible_gpus)

    def _to_gpu(self, resources: object, device: int, index: faiss.Index) -> FakeGpuIndex:
        self.single.append(device)
        self.made.append(FakeGpuIndex(index))
        return self.made[-1]

    def _to_all(self, index: faiss.Index, ngpu: int) -> FakeGpuIndex:
        self.sharded.append(ngpu)
        self.made.append(FakeGpuIndex(index))
        return self.made[-1]


def _flat_faiss() -> faiss.Index:
    return faiss.IndexIDMap(faiss.IndexFlatIP(8))


def test_gpu_absent_symbols_keep_the_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("StandardGpuResources", "index_cpu_to_gpu", "index_cpu_to_all_gpus"):
        monkeypatch.delattr(faiss, name, raising=False)
    index = _flat_faiss()
    assert maybe_to_gpu(index) is index
    assert maybe_to_gpu(index, gpus=4) is index


def test_gpu_selection_follows_the_visible_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=0)
    index = _flat_faiss()
    assert maybe_to_gpu(index) is index
    assert maybe_to_gpu(index, gpus=0) is index
    assert isinstance(maybe_to_gpu(index, gpus=1), FakeGpuIndex)
    assert isinstance(maybe_to_gpu(index, gpus=3), FakeGpuIndex)
    assert fake.single == [0]
    assert fake.sharded == [3]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert isinstance(maybe_to_gpu(index), FakeGpuIndex)
    assert fake.sharded == [3, 2]
    with pytest.raises(ValueError, match="gpus"):
        maybe_to_gpu(index, gpus=-1)


def test_gpu_leaves_hnsw_and_binary_indexes_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=1)
    hnsw = faiss.IndexIDMap(faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT))
    binary = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(256))
    assert maybe_to_gpu(hnsw) is hnsw
    assert maybe_to_gpu(binary) is binary
    assert isinstance(maybe_to_gpu(faiss.IndexFlatIP(8)), FakeGpuIndex)
    assert fake.single == [0]


def test_cosine_index_searches_the_gpu_copy_until_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=1)
    rng = np.random.default_rng(15)
    vectors = unit_vectors(rng, 50, 8)
    index = CosineIndex.build(np.arange(50), vectors)
    cpu_results = index.search(vectors, 3, 0.0)
    assert index.use_gpu() is True
    assert index.search(vectors, 3, 0.0) == cpu_results
    assert fake.made[0].searches == 1
    index.add(np.array([99]), unit_vectors(rng, 1, 8))
    index.search(vectors, 3, 0.0)
    assert fake.made[0].searches == 1  # changed: back on the CPU index
    assert index.use_gpu(gpus=0) is False
    hnsw = CosineIndex.build(np.arange(50), vectors, algorithm="hnsw")
    assert hnsw.use_gpu() is False
