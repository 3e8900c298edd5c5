"""The large-bank cosine index (``hnsw_pca``: projection learned at build, HNSW over the
projections, re-ranking by 8-bit full-width codes) on small generated data: recall against
exact search, full-width scores, removal, the serialized form, and the size-based choice."""

from __future__ import annotations

import numpy as np
import pytest

import moderation.banks.index.cosine as cosine_module
import moderation.banks.index.cosine_params as cosine_params
import moderation.banks.index.cosine_projection as cosine_projection
from moderation.banks.index import CosineIndex, load_index
from moderation.banks.index.cosine_projection import learn_projection

DIM = 384


def structured_vectors(seed: int, n: int, *, sources: int = 30) -> np.ndarray:
    """Unit vectors on a low-dimensional structure like real embeddings: Dirichlet mixtures of
    a few of ``sources`` fixed random directions plus small isotropic noise (the method
    ``moderation benchmark speed`` uses on real embeddings)."""
    base = np.random.default_rng(1234).standard_normal((sources, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sources, (n, 4))
    weights = rng.dirichlet(np.full(4, 0.5), n).astype(np.float32)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32) * (0.1 / np.sqrt(DIM))
    for k in range(4):
        vectors += weights[:, k, None] * base[picks[:, k]]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(4000, dtype=np.int64) * 7 + 3
    return ids, structured_vectors(1, 4000)


def _build(ids: np.ndarray, vectors: np.ndarray, algorithm: str) -> CosineIndex:
    """An index of each algorithm at this test's small sizes (projected ones: to 32-d)."""
    params = {"pca_dim": 32} if algorithm.endswith("_pca") else {}
    return CosineIndex.build(ids, vectors, algorithm=algorithm, **params)  # type: ignore[arg-type]


def _ids(hits: list[list]) -> list[list[int]]:  # type: ignore[type-arg]
    return [[h.id for h in row] for row in hits]


def test_projection_is_orthonormal_and_keeps_the_top_directions() -> None:
    vectors = structured_vectors(2, 3000)
    projection = learn_projection(vectors, 16)
    assert projection.shape == (16, DIM) and projection.dtype == np.float32
    np.testing.assert_allclose(projection @ projection.T, np.eye(16), atol=1e-4)
    kept = np.linalg.norm(vectors @ projection.T, axis=1) ** 2
    random = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, 16)))[0].T
    assert kept.mean() > 0.5 > (np.linalg.norm(vectors @ random.T, axis=1) ** 2).mean()


@pytest.mark.parametrize("algorithm", ["hnsw_pca", "ivf_pca"])
def test_recall_at_10_against_exact_and_full_width_scores(
    bank: tuple[np.ndarray, np.ndarray], algorithm: str
) -> None:
    ids, vectors = bank
    index = _build(ids, vectors, algorithm)
    exact = CosineIndex.build(ids, vectors, algorithm="flat")
    rng = np.random.default_rng(9)
    queries = vectors[rng.choice(len(vectors), 200, replace=False)]
    queries = queries + rng.standard_normal(queries.shape).astype(np.float32) * 0.01
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    approx_hits, exact_hits = index.search(queries, 10, -1.0), exact.search(queries, 10, -1.0)
    strict = np.mean(
        [
            len(set(a) & set(e)) / 10
            for a, e in zip(_ids(approx_hits), _ids(exact_hits), strict=True)
        ]
    )
    # ann-benchmarks' k-NN recall: a returned entry counts when its true cosine is within
    # 1e-3 of the true 10th best (quantised codes may swap near-ties, harmless for screening).
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    tolerant = np.mean(
        [
            np.mean([float(q @ by_id[h.id]) >= e[9].score - 1e-3 for h in a])
            for q, a, e in zip(queries, approx_hits, exact_hits, strict=True)
        ]
    )
    assert tolerant >= 0.99
    assert strict >= 0.95
    # Scores are full-width cosines (float16 codes), not cosines of the projections.
    top_error = max(
        abs(a[0].score - e[0].score) for a, e in zip(approx_hits, exact_hits, strict=True)
    )
    assert top_error < 1e-3
    projected_only = CosineIndex.build(ids, vectors, algorithm=algorithm, pca_dim=32, k_factor=1)  # type: ignore[arg-type]
    assert projected_only.params["k_factor"] == 1


ROUND_TRIP_PARAMS = {
    "hnsw_pca": {"pca_dim": 32, "hnsw_m": 16, "ef_search": 200, "k_factor": 8},
    "ivf_pca": {"pca_dim": 32, "nlist": 40, "nprobe": 8, "k_factor": 8},
}


@pytest.mark.parametrize("algorithm", sorted(ROUND_TRIP_PARAMS))
def test_round_trip_keeps_parameters_results_and_tombstones(
    bank: tuple[np.ndarray, np.ndarray], algorithm: str
) -> None:
    ids, vectors = bank
    given = ROUND_TRIP_PARAMS[algorithm]
    index = CosineIndex.build(ids, vectors, algorithm=algorithm, **given)  # type: ignore[arg-type]
    removed = ids[:50]
    assert index.remove(removed) == 50 and index.tombstones == 50
    restored = load_index(index.serialize())
    assert isinstance(restored, CosineIndex)
    expected = {"algorithm": algorithm, **given}
    if algorithm == "hnsw_pca":
        expected["ef_construction"] = cosine_params.HNSW_EF_CONSTRUCTION
    assert restored.params == expected
    assert restored.tombstones == 50 and len(restored) == len(ids) - 50
    queries = vectors[:80]
    assert _ids(restored.search(queries, 5, -1.0)) == _ids(index.search(queries, 5, -1.0))
    dead = set(removed.tolist())
    assert not any(h.id in dead for row in restored.search(queries, 10, -1.0) for h in row)
    # Later changes still work on the restored index, and compaction keeps the parameters.
    restored.add(np.array([1]), vectors[:1])
    assert restored.search(vectors[:1], 1, 0.99)[0][0].id == 1
    restored.remove(ids[: len(ids) // 2])  # past TOMBSTONE_COMPACT_FRACTION: rebuilt
    assert restored.tombstones == 0 and restored.params == expected
    kept = np.arange(len(ids) // 2, len(ids), 37)
    assert [row[0].id for row in restored.search(vectors[kept], 1, -1.0)] == ids[kept].tolist()


@pytest.mark.parametrize("algorithm", ["flat", "hnsw", "hnsw_pca", "ivf_pca"])
def test_loading_from_a_writable_buffer_is_zero_copy_until_changed(
    bank: tuple[np.ndarray, np.ndarray], algorithm: str
) -> None:
    ids, vectors = bank
    original = _build(ids, vectors, algorithm)
    serialized = original.serialize()
    buffer = bytearray(serialized)
    viewed = load_index(memoryview(buffer), authenticated=True)
    copied = load_index(serialized)
    assert isinstance(viewed, CosineIndex) and isinstance(copied, CosineIndex)
    assert viewed.zero_copy and not copied.zero_copy
    queries = vectors[::97]
    expected = _ids(original.search(queries, 5, -1.0))
    assert (
        _ids(viewed.search(queries, 5, -1.0)) == _ids(copied.search(queries, 5, -1.0)) == expected
    )
    # A change first makes an owned copy (FAISS would abort on resizing a view) and leaves the
    # buffer, which other readers may share, as it was.
    extra = structured_vectors(77, 3)
    viewed.add(np.array([1, 2, 4]), extra)
    assert not viewed.zero_copy and bytes(buffer) == serialized
    assert [row[0].id for row in viewed.search(extra, 1, -1.0)] == [1, 2, 4]
    assert viewed.remove(ids[:10]) == 10
    assert not any(
        h.id in set(ids[:10].tolist()) for row in viewed.search(vectors[:10], 5, -1.0) for h in row
    )
    assert bytes(buffer) == serialized


def test_compaction_relearns_and_keeps_entries_findable(
    bank: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vectors = bank
    index = CosineIndex.build(ids, vectors, algorithm="hnsw_pca", pca_dim=32)
    index.remove(ids[: len(ids) // 2])  # past TOMBSTONE_COMPACT_FRACTION: rebuilt
    assert index.tombstones == 0 and len(index) == len(ids) - len(ids) // 2
    kept = np.arange(len(ids) // 2, len(ids), 37)
    found = [row[0].id for row in index.search(vectors[kept], 1, -1.0)]
    assert found == ids[kept].tolist()


def test_auto_choice_by_bank_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cosine_module, "HNSW_MIN_ENTRIES", 100)
    monkeypatch.setattr(cosine_module, "PCA_MIN_ENTRIES", 300)
    vectors = structured_vectors(3, 300)
    assert CosineIndex.build(np.arange(99), vectors[:99]).algorithm == "flat"
    assert CosineIndex.build(np.arange(299), vectors[:299]).algorithm == "hnsw"
    large = CosineIndex.build(np.arange(300), vectors, pca_dim=16)
    assert large.params == {
        "algorithm": "ivf_pca",
        "nlist": 300 // 39,  # at least 39 training rows per list
        "nprobe": cosine_projection.IVF_NPROBE,
        "pca_dim": 16,
        "k_factor": cosine_projection.REFINE_K_FACTOR,
    }
    assert cosine_projection.ivf_nlist(1_000_000) == 2048 and cosine_projection.ivf_nlist(100) == 64
    assert cosine_projection.ivf_nlist(100_000) == 512
    # Vectors no wider than the projection: plain HNSW.
    assert CosineIndex.build(np.arange(300), vectors, pca_dim=DIM).algorithm == "hnsw"


def test_bad_pca_parameters_and_layouts_are_refused(bank: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = bank
    with pytest.raises(ValueError, match="pca_dim"):
        CosineIndex(DIM, algorithm="hnsw_pca", pca_dim=DIM)
    with pytest.raises(ValueError, match="k_factor"):
        CosineIndex(DIM, algorithm="hnsw_pca", k_factor=0)
    with pytest.raises(ValueError, match="nprobe"):
        CosineIndex(DIM, algorithm="ivf_pca", nprobe=0)
    with pytest.raises(ValueError, match="at least nlist=64"):
        CosineIndex.build(ids[:50], vectors[:50], algorithm="ivf_pca", pca_dim=16, nlist=64)
    # A header claiming hnsw_pca over a plain HNSW graph is refused.
    import json
    import struct

    plain = CosineIndex.build(ids[:300], vectors[:300], algorithm="hnsw").serialize()
    (length,) = struct.unpack(">I", plain[8:12])
    header = json.loads(plain[12 : 12 + length])
    header["params"].update(algorithm="hnsw_pca", pca_dim=32, k_factor=8)
    encoded = json.dumps(header).encode()
    forged = plain[:8] + struct.pack(">I", len(encoded)) + encoded + plain[12 + length :]
    with pytest.raises(ValueError, match="IndexRefine"):
        load_index(forged)


def test_authenticated_loading_skips_only_the_digest_checks(
    bank: tuple[np.ndarray, np.ndarray],
) -> None:
    import json
    import struct

    ids, vectors = bank
    blob = CosineIndex.build(ids[:200], vectors[:200], algorithm="flat").serialize()
    (length,) = struct.unpack(">I", blob[8:12])
    header = json.loads(blob[12 : 12 + length])
    header["sections"][0]["sha256"] = "0" * 64
    encoded = json.dumps(header).encode()
    wrong_digest = blob[:8] + struct.pack(">I", len(encoded)) + encoded + blob[12 + length :]
    with pytest.raises(ValueError, match="SHA-256"):
        load_index(wrong_digest)
    restored = load_index(memoryview(wrong_digest), authenticated=True)
    assert len(restored) == 200
    with pytest.raises(ValueError, match="unexpected bytes"):
        load_index(wrong_digest + b"x", authenticated=True)


@pytest.mark.parametrize("algorithm", ["flat", "hnsw", "hnsw_pca", "ivf_pca"])
def test_reconstruct_returns_stored_vectors_without_drift(
    bank: tuple[np.ndarray, np.ndarray], algorithm: str
) -> None:
    ids, vectors = bank
    index = _build(ids, vectors, algorithm)
    picked = np.array([ids[5], ids[0], ids[-1], ids[7]])
    got = index.reconstruct(picked)
    assert got.shape == (4, DIM) and got.dtype == np.float32
    expected = vectors[[5, 0, len(ids) - 1, 7]]
    if algorithm.endswith("_pca"):  # float16 codes
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert not np.array_equal(got, expected)
    else:
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    # Decoded rows re-encode to the same codes: a rebuilt index gives back the same vectors.
    decoded = index.reconstruct(ids)
    again = _build(ids, decoded, algorithm)
    np.testing.assert_array_equal(again.reconstruct(ids), decoded)
    # Zero-copy loaded indexes answer the same; removed and unknown ids are refused.
    loaded = load_index(memoryview(bytearray(index.serialize())), authenticated=True)
    assert isinstance(loaded, CosineIndex) and loaded.zero_copy
    np.testing.assert_array_equal(loaded.reconstruct(picked), got)
    index.remove([int(ids[0])])
    with pytest.raises(KeyError):
        index.reconstruct([int(ids[0])])
    with pytest.raises(KeyError):
        index.reconstruct([10**12])
    assert index.reconstruct(np.zeros(0, np.int64)).shape == (0, DIM)


def test_forged_tombstones_are_refused(bank: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = bank
    index = CosineIndex.build(ids[:300], vectors[:300], algorithm="hnsw")
    index.remove([int(ids[3]), int(ids[4])])
    blob = index.serialize()  # the tombstones section comes last: 2 x int64
    assert load_index(blob[:-16] + np.array(ids[[3, 4]], "<i8").tobytes()).tombstones == 2
    for forged in (ids[[3, 3]], np.array([ids[3], 10**12])):
        with pytest.raises(ValueError, match="tombstones must be distinct ids present"):
            load_index(blob[:-16] + np.asarray(forged, "<i8").tobytes(), authenticated=True)
