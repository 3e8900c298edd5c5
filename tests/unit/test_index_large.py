"""The large-bank cosine index (``hnsw_pca``: projection learned at build, HNSW over the
projections, re-ranking by 8-bit full-width codes) on small generated data: recall against
exact search, full-width scores, removal, the serialized form, and the size-based choice."""

from __future__ import annotations

import numpy as np
import pytest

import moderation.index.cosine as cosine_module
from moderation.index import CosineIndex, load_index
from moderation.index.cosine import learn_projection

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


def test_recall_at_10_against_exact_and_full_width_scores(
    bank: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vectors = bank
    index = CosineIndex.build(ids, vectors, algorithm="hnsw_pca", pca_dim=32)
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
    # 1e-3 of the true 10th best (8-bit codes may swap near-ties, harmless for screening).
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    tolerant = np.mean(
        [
            np.mean([float(q @ by_id[h.id]) >= e[9].score - 1e-3 for h in a])
            for q, a, e in zip(queries, approx_hits, exact_hits, strict=True)
        ]
    )
    assert tolerant >= 0.99
    assert strict >= 0.95
    # Scores are full-width cosines (8-bit codes), not cosines of the projections.
    top_error = max(
        abs(a[0].score - e[0].score) for a, e in zip(approx_hits, exact_hits, strict=True)
    )
    assert top_error < 0.01
    projected_only = CosineIndex.build(ids, vectors, algorithm="hnsw_pca", pca_dim=32, k_factor=1)
    assert projected_only.params["k_factor"] == 1


def test_round_trip_keeps_parameters_results_and_tombstones(
    bank: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vectors = bank
    index = CosineIndex.build(
        ids, vectors, algorithm="hnsw_pca", pca_dim=32, hnsw_m=16, ef_search=200, k_factor=8
    )
    removed = ids[:50]
    assert index.remove(removed) == 50 and index.tombstones == 50
    restored = load_index(index.serialize())
    assert isinstance(restored, CosineIndex)
    assert restored.params == {
        "algorithm": "hnsw_pca",
        "hnsw_m": 16,
        "ef_construction": cosine_module.HNSW_EF_CONSTRUCTION,
        "ef_search": 200,
        "pca_dim": 32,
        "k_factor": 8,
    }
    assert restored.tombstones == 50 and len(restored) == len(ids) - 50
    queries = vectors[:80]
    assert _ids(restored.search(queries, 5, -1.0)) == _ids(index.search(queries, 5, -1.0))
    dead = set(removed.tolist())
    assert not any(h.id in dead for row in restored.search(queries, 10, -1.0) for h in row)
    # Later changes still work on the restored index.
    restored.add(np.array([1]), vectors[:1])
    assert restored.search(vectors[:1], 1, 0.99)[0][0].id == 1


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
    assert (
        large.algorithm == "hnsw_pca" and large.params["ef_search"] == cosine_module.PCA_EF_SEARCH
    )
    # Vectors no wider than the projection: plain HNSW.
    assert CosineIndex.build(np.arange(300), vectors, pca_dim=DIM).algorithm == "hnsw"


def test_bad_pca_parameters_and_layouts_are_refused(bank: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = bank
    with pytest.raises(ValueError, match="pca_dim"):
        CosineIndex(DIM, algorithm="hnsw_pca", pca_dim=DIM)
    with pytest.raises(ValueError, match="k_factor"):
        CosineIndex(DIM, algorithm="hnsw_pca", k_factor=0)
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
