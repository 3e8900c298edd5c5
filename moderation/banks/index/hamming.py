"""Hamming-distance index over 256-bit PDQ digests (FAISS binary flat index).

python-threatexchange ``signal_type/pdq/pdq_index2.py`` stores PDQ bits as 256 floats in
``IndexFlatL2`` and uses ``range_search``; a binary index holds the 32-byte digests as they are
(32 bytes per entry instead of 1 KiB) and computes Hamming distance with popcount. The scan is
exact; at 32 bytes per entry a million-entry bank is a 32 MB scan per query.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, Self

import faiss
import numpy as np
import numpy.typing as npt

from moderation.banks.index.base import (
    Buffer,
    Hit,
    IdArray,
    ParamValue,
    SignalIndex,
    check_ids,
    check_k,
    check_matrix,
    check_no_duplicates,
    check_threshold,
    ids_from_iterable,
    merge_sorted,
)
from moderation.signals.pdq import PDQ_BITS, PDQ_DIGEST_BYTES

logger = logging.getLogger(__name__)

_SECTIONS: Final = {"faiss"}


class HammingIndex(SignalIndex):
    """Hamming distance over uint8 ``(n, 32)`` PDQ digests; ``Hit.score`` is distance in bits."""

    kind = "hamming"

    def __init__(self) -> None:
        """An empty index of 32-byte (256-bit) digests."""
        self._index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(PDQ_BITS))
        self._ids: IdArray = np.empty(0, dtype=np.int64)

    @classmethod
    def build(cls, ids: npt.ArrayLike, vectors: npt.ArrayLike, **params: Any) -> Self:
        """Build from ``(n,)`` int ids and ``(n, 32)`` uint8 digests (no parameters).

        Raises:
            ValueError: malformed input (see :class:`SignalIndex`) or any parameter.
        """
        if params:
            raise ValueError(f"HammingIndex takes no parameters, got {sorted(params)}")
        index = cls()
        index.add(ids, vectors)
        return index

    @property
    def dim(self) -> int:
        """Digest width in bytes (32)."""
        return PDQ_DIGEST_BYTES

    @property
    def params(self) -> dict[str, ParamValue]:
        """``bits``: digest width in bits (256)."""
        return {"bits": PDQ_BITS}

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add uint8 digests under new ids (see :meth:`SignalIndex.add`)."""
        new_ids = check_ids(ids)
        matrix = check_matrix(vectors, dtype=np.uint8, dim=PDQ_DIGEST_BYTES, what="digests")
        if new_ids.size != matrix.shape[0]:
            raise ValueError(f"{new_ids.size} ids for {matrix.shape[0]} digests")
        check_no_duplicates(self._ids, new_ids)
        if new_ids.size == 0:
            return
        self._index.add_with_ids(matrix, new_ids)
        self._ids = merge_sorted(self._ids, new_ids)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id (deleted from FAISS, no tombstones)."""
        present = np.intersect1d(self._ids, ids_from_iterable(ids), assume_unique=True)
        if present.size == 0:
            return 0
        removed = self._index.remove_ids(faiss.IDSelectorBatch(present))
        if removed != present.size:
            raise RuntimeError(f"FAISS removed {removed} of {present.size} entries")
        self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        return int(present.size)

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Hits with distance <= ``threshold`` (bits, 0-256), nearest first, at most ``k``.

        Uses a range search so that every entry within the threshold is considered and ties
        at the k-th distance are broken by id, deterministically; a k-nearest search would
        let FAISS pick arbitrarily among equally distant entries.
        """
        matrix = check_matrix(queries, dtype=np.uint8, dim=PDQ_DIGEST_BYTES, what="queries")
        k = check_k(k)
        ceiling = check_threshold(threshold, 0.0, float(PDQ_BITS), "Hamming")
        if len(self) == 0:
            return [[] for _ in range(matrix.shape[0])]
        # FAISS keeps distances strictly below the radius; distances are whole bits.
        radius = math.floor(ceiling) + 1
        limits, distances, labels = self._index.range_search(matrix, radius)
        results: list[list[Hit]] = []
        for row in range(matrix.shape[0]):
            lo, hi = int(limits[row]), int(limits[row + 1])
            row_d = distances[lo:hi].astype(np.int64)
            row_i = labels[lo:hi]
            order = np.lexsort((row_i, row_d))[:k]
            results.append([Hit(int(row_i[j]), float(row_d[j])) for j in order])
        return results

    def _sections(self) -> dict[str, bytes]:
        return {"faiss": faiss.serialize_index_binary(self._index).tobytes()}

    @classmethod
    def _from_sections(
        cls,
        dim: int,
        count: int,
        params: Mapping[str, Any],
        sections: Mapping[str, Buffer],
    ) -> Self:
        if dim != PDQ_DIGEST_BYTES or dict(params) != {"bits": PDQ_BITS}:
            raise ValueError(
                f"Hamming index must be {PDQ_DIGEST_BYTES} bytes / {PDQ_BITS} bits, "
                f"got dim {dim} and params {dict(params)}"
            )
        if set(sections) != _SECTIONS:
            raise ValueError(f"Hamming index needs sections {sorted(_SECTIONS)}")
        try:
            loaded = faiss.deserialize_index_binary(
                np.frombuffer(sections["faiss"], dtype=np.uint8)
            )
        except RuntimeError as exc:
            raise ValueError(f"FAISS could not read the index: {exc}") from exc
        if not isinstance(loaded, faiss.IndexBinaryIDMap) or loaded.d != PDQ_BITS:
            raise ValueError(f"expected a 256-bit IndexBinaryIDMap, got {type(loaded).__name__}")
        if not isinstance(faiss.downcast_IndexBinary(loaded.index), faiss.IndexBinaryFlat):
            raise ValueError("expected an IndexBinaryFlat inside the id map")
        labels = faiss.vector_to_array(loaded.id_map).astype(np.int64)
        if labels.size != loaded.ntotal or np.unique(labels).size != labels.size:
            raise ValueError("the FAISS id map is inconsistent (wrong size or repeated ids)")
        if labels.size != count:
            raise ValueError(f"header says {count} entries, index holds {labels.size}")
        index = cls()
        index._index = loaded
        index._ids = np.sort(labels)
        return index
