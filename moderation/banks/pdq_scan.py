"""An exact Hamming-distance scan over PDQ digests in NumPy, for processes without FAISS.

The web tier's hash lookup (:mod:`moderation.banks.lookup`, the HMA-compatible API) searches
the bank's PDQ digests without :class:`~moderation.banks.index.HammingIndex`, whose FAISS
library costs every web process its shared objects and OpenMP runtime. The scan answers what
``HammingIndex.search`` answers for one query (every digest within the threshold, nearest
first, ties by id, at most ``k``): XOR of the four 64-bit words of each 256-bit digest, then
popcount (``numpy.bitwise_count``, NumPy >= 2.0). It reads 32 bytes per entry per query,
as the index's ``flat`` algorithm does: about 32 MB for a million entries.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moderation.signals.pdq import PDQ_BITS, PDQ_DIGEST_BYTES

_WORDS = PDQ_DIGEST_BYTES // 8


class PdqScan:
    """Entry ids and their 256-bit PDQ digests, searched by a linear scan (immutable)."""

    def __init__(self, ids: npt.ArrayLike, digests: npt.ArrayLike) -> None:
        """``ids``: int64 ``(n,)``, unique; ``digests``: uint8 ``(n, 32)``.

        Raises:
            ValueError: wrong shapes or dtypes, or a repeated id.
        """
        id_array = np.asarray(ids)
        digest_array = np.asarray(digests)
        if id_array.ndim != 1 or not np.issubdtype(id_array.dtype, np.integer):
            raise ValueError(
                f"ids must be a 1-d integer array, got {id_array.dtype} {id_array.shape}"
            )
        if digest_array.dtype != np.uint8 or digest_array.shape != (
            len(id_array),
            PDQ_DIGEST_BYTES,
        ):
            raise ValueError(
                f"digests must be uint8 ({len(id_array)}, {PDQ_DIGEST_BYTES}), "
                f"got {digest_array.dtype} {digest_array.shape}"
            )
        if len(np.unique(id_array)) != len(id_array):
            raise ValueError("ids must be unique")
        self._ids = id_array.astype(np.int64)
        # Big-endian words keep the bytes in order; popcount does not care either way.
        self._words = np.ascontiguousarray(digest_array).view(">u8").reshape(-1, _WORDS)

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, digest: bytes, k: int, threshold: int) -> list[tuple[int, int]]:
        """``(entry id, distance in bits)`` of the digests within ``threshold`` bits (0-256) of
        ``digest`` (32 bytes), nearest first then by id, at most ``k``.

        Raises:
            ValueError: ``digest`` is not 32 bytes, ``k`` < 1 or ``threshold`` outside 0-256.
        """
        if len(digest) != PDQ_DIGEST_BYTES:
            raise ValueError(f"a PDQ digest is {PDQ_DIGEST_BYTES} bytes, got {len(digest)}")
        if k < 1 or not 0 <= threshold <= PDQ_BITS:
            raise ValueError(f"need k >= 1 and 0 <= threshold <= {PDQ_BITS}")
        if not len(self._ids):
            return []
        query = np.frombuffer(digest, dtype=">u8")
        distances = np.bitwise_count(self._words ^ query).sum(axis=1, dtype=np.int64)
        near = np.flatnonzero(distances <= threshold)
        order = np.lexsort((self._ids[near], distances[near]))[:k]
        return [(int(self._ids[near[j]]), int(distances[near[j]])) for j in order]
