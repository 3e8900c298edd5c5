"""Tuning and validation shared by :class:`~moderation.banks.index.cosine.CosineIndex`: the
HNSW, tombstone and unit-norm constants with the measurements behind them, the algorithm names
and their header parameters, and the checks and renormalisation of vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

#: HNSW graph degree. 32 is the FAISS wiki's usual choice ("HNSW32"; M from 4 to 64 trades
#: memory, 2*M*4 bytes of links per entry at level 0, for recall).
HNSW_M: Final = 32

#: HNSW candidate-list size while building. FAISS defaults to 40; 100 gave recall@10 of 0.99
#: (efSearch 128) on 20k random 64-d unit vectors, a harder case than real embeddings, while
#: building in half the time of 200 (measured: 5 s versus 10 s on 2 loaded cores).
HNSW_EF_CONSTRUCTION: Final = 100

#: HNSW candidate-list size while searching (raised to ``k`` when ``k`` is larger). 128 gave
#: recall@10 >= 0.98 in the measurement above, where FAISS's default of 16 gives far less; the
#: cost stays about 1-2 ms per query.
HNSW_EF_SEARCH: Final = 128

#: Largest tolerated deviation of a vector's L2 norm from 1. The encoder normalises in float32
#: (norm error about 1e-7 * sqrt(dim)); 1e-3 also admits vectors stored as float16 and widened,
#: while an unnormalised embedding (norm typically 5-50) is refused instead of giving wrong
#: cosines.
UNIT_NORM_TOLERANCE: Final = 1e-3

#: HNSW cannot delete. Removed ids become tombstones, skipped during search through a FAISS
#: ``IDSelector``; once they exceed this fraction of the graph the graph is rebuilt from its
#: stored vectors without them. Dead nodes still cost traversal time and dilute the candidate
#: list, so letting them pile up degrades speed and recall; rebuilding costs a full HNSW build,
#: amortised over at least this fraction of the bank in removals.
TOMBSTONE_COMPACT_FRACTION: Final = 0.2

Algorithm = Literal["flat", "hnsw", "hnsw_pca", "ivf_pca", "ivf_disk"]
#: Header parameters of each algorithm, in the order :attr:`CosineIndex.params` lists them.
PARAM_ORDER: Final[dict[str, tuple[str, ...]]] = {
    "flat": ("algorithm",),
    "hnsw": ("algorithm", "hnsw_m", "ef_construction", "ef_search"),
    "hnsw_pca": ("algorithm", "hnsw_m", "ef_construction", "ef_search", "pca_dim", "k_factor"),
    "ivf_pca": ("algorithm", "nlist", "nprobe", "pca_dim", "k_factor"),
    "ivf_disk": ("algorithm", "nlist", "nprobe", "pca_dim", "k_factor"),
}
PARAM_KEYS: Final = {name: set(keys) for name, keys in PARAM_ORDER.items()}
#: Header parameters of each algorithm.
PROJECTED: Final = ("hnsw_pca", "ivf_pca")


def renormalise_decoded(decoded: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Stored vectors read back from FAISS, float32 (n, d): float32 rows and float16 codes come
    back within :data:`UNIT_NORM_TOLERANCE` / 2 of unit norm and are returned as they are (so
    re-adding them is lossless); 8-bit codes of older indexes are renormalised."""
    vectors = np.asarray(decoded, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE / 2):
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def check_unit_norm(vectors: npt.NDArray[np.float32], what: str) -> None:
    """Raise ValueError naming the first row of float32 ``(n, d)`` ``vectors`` whose L2 norm is
    more than :data:`UNIT_NORM_TOLERANCE` from 1."""
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{what} must be L2-normalised (|norm - 1| <= {UNIT_NORM_TOLERANCE}); "
            f"row {row} has norm {float(norms[row]):.6g} ({bad.size} row(s) in all)"
        )


def positive_int(value: object, name: str) -> int:
    """``value`` as an int when it is a positive integer; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_header(params: Mapping[str, Any], sections: Mapping[str, object]) -> None:
    """Check that a serialized cosine index's header ``params`` and its ``sections`` are
    exactly those its algorithm has. Raises ValueError."""
    algorithm = params.get("algorithm")
    if algorithm not in PARAM_KEYS:
        raise ValueError(f"unknown cosine index algorithm {algorithm!r}")
    if set(params) != PARAM_KEYS[algorithm]:
        raise ValueError(f"cosine {algorithm} params must be {sorted(PARAM_KEYS[algorithm])}")
    expected = {"faiss"} if algorithm == "flat" else {"faiss", "tombstones"}
    if algorithm == "ivf_disk":
        expected = {"faiss", "labels", "rows"}
    if set(sections) != expected:
        raise ValueError(f"cosine {algorithm} index needs sections {sorted(expected)}")
