"""Reading a serialized cosine FAISS index back: zero-copy reads into the caller's buffer
(FAISS ``ZeroCopyIOReader``), and consistency checks of its parts, id map and tombstones.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from moderation.banks.index.base import Buffer, IdArray


def read_faiss(
    blob: Buffer, dim: int, *, wrapper: type[Any] = faiss.IndexIDMap
) -> tuple[Any, npt.NDArray[np.uint8] | None]:
    """The ``dim``-wide FAISS ``wrapper`` index (``IndexIDMap``, or the ``IndexPreTransform``
    of ``ivf_disk``) serialized in ``blob``, and the buffer its arrays are views into
    (zero-copy, when ``blob`` is writable and not empty) or None (a copy).

    Raises:
        ValueError: FAISS cannot read ``blob``, or it holds another index type or width, or
            one that does not use inner product.
    """
    raw = np.frombuffer(blob, dtype=np.uint8)
    backing = None
    try:
        if raw.flags.writeable and raw.size:
            # Zero-copy: FAISS's arrays become views into ``raw`` (the caller keeps it alive).
            # faiss's bundled stubs lack ZeroCopyIOReader (FAISS >= 1.10).
            reader = faiss.ZeroCopyIOReader(  # type: ignore[attr-defined]
                faiss.swig_ptr(raw), raw.size
            )
            loaded = faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
            backing = raw
        else:  # read-only bytes: FAISS must not point into memory it may not own
            loaded = faiss.deserialize_index(raw)
    except RuntimeError as exc:
        raise ValueError(f"FAISS could not read the index: {exc}") from exc
    if not isinstance(loaded, wrapper) or loaded.d != dim:
        raise ValueError(
            f"expected a {dim}-d FAISS {wrapper.__name__}, got {type(loaded).__name__}"
        )
    if faiss.downcast_index(loaded.index).metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("the FAISS index does not use inner product")
    return loaded, backing


def tombstones_from(blob: Buffer) -> IdArray:
    """The int64 tombstone ids of a ``tombstones`` section (little-endian). Raises ValueError."""
    if len(blob) % 8:
        raise ValueError("tombstones section is not a whole number of int64")
    return np.frombuffer(blob, dtype="<i8").astype(np.int64)


def check_id_map(
    loaded: faiss.IndexIDMap, tombstones: IdArray, count: int
) -> tuple[IdArray, IdArray, IdArray, IdArray]:
    """Check that ``loaded``'s id labels are distinct, that ``tombstones`` are distinct labels
    and that ``count`` labels are live.

    Returns:
        ``(labels, order, live, tombstones)``: FAISS position -> id labels, their ascending
        order, the live ids ascending and the tombstones ascending (int64 arrays).

    Raises:
        ValueError: any check fails.
    """
    labels = faiss.vector_to_array(loaded.id_map).astype(np.int64)
    # One sort serves every check (numpy's hash-based unique took a second at 1M ids).
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    tombstones = np.sort(tombstones)
    if labels.size != loaded.ntotal or _has_repeats(ordered):
        raise ValueError("the FAISS id map is inconsistent (wrong size or repeated ids)")
    found = np.searchsorted(ordered, tombstones)
    if (
        _has_repeats(tombstones)
        or not bool(np.all(found < ordered.size))
        or not np.array_equal(ordered[found], tombstones)
    ):
        raise ValueError("tombstones must be distinct ids present in the index")
    live = np.delete(ordered, found)
    if live.size != count:
        raise ValueError(f"header says {count} entries, index holds {live.size}")
    return labels, order, live, tombstones


def check_ivf(inner: Any, nlist: int, nprobe: int) -> None:
    """Check that ``inner`` is an 8-bit IVF index of ``nlist`` lists; set its ``nprobe``.
    Raises ValueError."""
    if not isinstance(inner, faiss.IndexIVFScalarQuantizer) or inner.nlist != nlist:
        raise ValueError(f"expected an 8-bit IVF index with {nlist} lists")
    inner.nprobe = nprobe


def check_hnsw(inner: Any, hnsw_m: int, ef_search: int) -> None:
    """Check that ``inner`` is an ``IndexHNSWFlat`` of degree ``hnsw_m``; set its
    ``efSearch``. Raises ValueError."""
    if not isinstance(inner, faiss.IndexHNSWFlat):
        raise ValueError(f"expected IndexHNSWFlat, got {type(inner).__name__}")
    levels = faiss.vector_to_array(inner.hnsw.cum_nneighbor_per_level)
    if levels.size < 3 or int(levels[2] - levels[1]) != hnsw_m:
        raise ValueError("HNSW graph degree does not match the header's hnsw_m")
    inner.hnsw.efSearch = ef_search


def _has_repeats(ascending: IdArray) -> bool:
    """Whether a sorted id array holds a value twice."""
    return bool(ascending.size > 1 and np.any(ascending[1:] == ascending[:-1]))
