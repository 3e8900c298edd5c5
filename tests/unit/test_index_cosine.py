"""Cosine signal index: exact (flat) and HNSW search against a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import moderation.banks.index.cosine as cosine_module
import moderation.banks.index.cosine_params as cosine_params
from moderation.banks.index import (
    HNSW_EF_SEARCH,
    CosineIndex,
    Hit,
)
from tests.unit.conftest import (
    random_ids,
    unit_vectors,
)

# Tolerance between FAISS float32 scores and a float64 numpy reference.
SCORE_TOL = 1e-5


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
