"""FAISS indexes of bank entries behind one interface (STYLE.md rule 19).

:class:`CosineIndex` holds embedding vectors (cosine similarity), :class:`HammingIndex` holds
PDQ digests (Hamming distance); both are :class:`SignalIndex` and serialize to the same
pickle-free format, which :func:`load_index` reads back whatever the kind.
"""

from __future__ import annotations

from pathlib import Path

from moderation.banks.faiss_threads import apply_faiss_threads
from moderation.banks.index.base import FORMAT_VERSION, Buffer, Hit, SignalIndex, read_index
from moderation.banks.index.cosine import HNSW_MIN_ENTRIES, CosineIndex
from moderation.banks.index.cosine_params import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    TOMBSTONE_COMPACT_FRACTION,
    UNIT_NORM_TOLERANCE,
)
from moderation.banks.index.gpu import maybe_to_gpu
from moderation.banks.index.hamming import HammingIndex

apply_faiss_threads()  # Settings.faiss_threads of a Runtime created before this import

__all__ = [
    "FORMAT_VERSION",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "HNSW_MIN_ENTRIES",
    "TOMBSTONE_COMPACT_FRACTION",
    "UNIT_NORM_TOLERANCE",
    "CosineIndex",
    "HammingIndex",
    "Hit",
    "SignalIndex",
    "load_index",
    "maybe_to_gpu",
]


def load_index(
    data: Buffer, *, authenticated: bool = False, row_dir: Path | None = None
) -> SignalIndex:
    """Deserialize an index of any kind from :meth:`SignalIndex.serialize` bytes
    (``authenticated``: see :func:`~moderation.banks.index.base.read_index`); an ``ivf_disk``
    cosine index opens its row file in ``row_dir`` (the snapshot directory) when given.

    Raises:
        ValueError: malformed, truncated or corrupted data, an unknown index type, or an
            ``ivf_disk`` row file missing from ``row_dir`` or not the one the bytes name
            (:class:`~moderation.banks.rowfile.RowFileError`).
    """
    index = read_index(data, authenticated=authenticated)
    if row_dir is not None and isinstance(index, CosineIndex):
        index.open_rows(row_dir)
    return index
