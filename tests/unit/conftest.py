"""Shared helpers of the unit tests: random unit vectors and ids for the signal index tests
(``test_index_*.py``).
"""

from __future__ import annotations

import numpy as np


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(10**12, size=n, replace=False).astype(np.int64)
