"""PDQ Hamming signal index: flat scan and multi-index hashing against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moderation.banks.index.hamming as hamming_module
from moderation.banks.index import (
    HammingIndex,
    Hit,
)
from moderation.signals.pdq import hamming_distances
from tests.unit.conftest import (
    random_ids,
)


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
