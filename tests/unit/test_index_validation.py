"""Signal index input validation: build, add and search arguments, membership."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moderation.banks.index import (
    CosineIndex,
    HammingIndex,
)
from tests.unit.conftest import (
    unit_vectors,
)

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
