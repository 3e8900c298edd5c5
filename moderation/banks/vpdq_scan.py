"""vPDQ matching of a video against every vPDQ entry of a snapshot, by a linear scan in NumPy.

python-threatexchange matches a query video against one vPDQ signature with
``vpdq_brute_matcher.match_VPDQ_hash_brute`` and against an index of them with
``VPDQIndex.query`` (``extensions/vpdq/vpdq_index.py``, FAISS over the distinct frame hashes):
each side's frames are deduplicated (an exactly repeated hash counts once) and those of PDQ
quality below :data:`~moderation.signals.vpdq.VPDQ_QUALITY_THRESHOLD` dropped; a frame matches
when some frame of the other side is within :data:`~moderation.signals.vpdq.VPDQ_DISTANCE_THRESHOLD`
bits (Hamming distance); the query match percentage is the share of the query's frames that
match the entry, the compared match percentage the share of the entry's frames that match the
query. (``VPDQIndex`` filters by quality before deduplicating, the brute matcher after; they
differ only when one hash occurs twice with two qualities, and this module follows the brute
matcher.) :class:`VpdqScan` computes both percentages for every entry at once (the same numbers as
:func:`moderation.signals.vpdq.match_features` per entry, whose agreement with
python-threatexchange the tests check), XOR and popcount over the frames' four 64-bit words as
:class:`moderation.banks.pdq_scan.PdqScan` does, in chunks of frames so that memory stays under
about 30 MB whatever the bank's size. The caller applies the thresholds (a policy's, or
``VPDQSignal``'s defaults for the HMA API).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from moderation.banks.hash_entries import HashEntries
from moderation.signals.pdq import PDQ_DIGEST_BYTES
from moderation.signals.vpdq import (
    VPDQ_DISTANCE_THRESHOLD,
    VPDQ_QUALITY_THRESHOLD,
    VpdqFeature,
    VpdqMatch,
    usable,
)

_WORDS: Final = PDQ_DIGEST_BYTES // 8
#: Query frames x bank frames compared per step: bounds the (q, c) uint64 XOR to 16 MB.
_PAIRS_PER_STEP: Final = 2_000_000


class VpdqScan:
    """The usable frames of some vPDQ entries, matched by a linear scan (immutable)."""

    def __init__(
        self,
        owners: npt.NDArray[np.int64],
        digests: npt.NDArray[np.uint8],
        qualities: npt.NDArray[np.uint8],
        quality_threshold: int = VPDQ_QUALITY_THRESHOLD,
    ) -> None:
        """``owners``: int64 ``(v,)``, the entry of each frame, an entry's frames in its
        signal's order; ``digests``: uint8 ``(v, 32)``; ``qualities``: uint8 ``(v,)`` 0-100.
        An entry left with no usable frame cannot match (python-threatexchange does not index
        it).

        Raises:
            ValueError: the arrays disagree in length or width.
        """
        if not (len(owners) == len(digests) == len(qualities)) or digests.shape[1:] != (32,):
            raise ValueError("vPDQ frame arrays must be (v,), (v, 32) and (v,)")
        # Dedupe: the first occurrence of each (entry, hash); then the quality filter.
        rows = np.concatenate([owners.astype("<i8").view(np.uint8).reshape(-1, 8), digests], 1)
        _, first = np.unique(np.ascontiguousarray(rows).view("V40").ravel(), return_index=True)
        first.sort()
        kept = first[qualities[first] >= quality_threshold]
        self.ids, self._owner = np.unique(owners[kept], return_inverse=True)
        self._counts = np.bincount(self._owner, minlength=len(self.ids))
        # Native words (popcount of a XOR does not depend on the byte order), one row per word:
        # XOR as an outer product of one word column is ~15x faster than a 3-d broadcast.
        words = np.ascontiguousarray(digests[kept]).view(np.uint64).reshape(-1, _WORDS)
        self._words = np.ascontiguousarray(words.T)
        self.quality_threshold = quality_threshold

    @classmethod
    def of(cls, hashes: HashEntries, entry_ids: npt.ArrayLike) -> VpdqScan:
        """The scan of the vPDQ entries among ``entry_ids`` (int64) in ``hashes``."""
        rows = np.isin(hashes.vpdq_entry_ids, np.asarray(entry_ids, np.int64))
        return cls(hashes.vpdq_entry_ids[rows], hashes.vpdq_pdq[rows], hashes.vpdq_quality[rows])

    @classmethod
    def empty(cls) -> VpdqScan:
        """A scan of no entries."""
        return cls(np.zeros(0, np.int64), np.zeros((0, 32), np.uint8), np.zeros(0, np.uint8))

    def __len__(self) -> int:
        """Entries with at least one usable frame."""
        return len(self.ids)

    def search(
        self, query: Sequence[VpdqFeature], distance_threshold: int = VPDQ_DISTANCE_THRESHOLD
    ) -> list[tuple[int, VpdqMatch]]:
        """``(entry id, percentages)`` of every entry that shares a matching frame with
        ``query`` (a video's features), highest query match percentage first, then compared
        match percentage, then id. Percentages are 0-100, computed as python-threatexchange
        computes them (``count * 100 / frames``). A query with no usable frame matches nothing.
        """
        frames = usable(query, self.quality_threshold)
        if not frames or not len(self.ids):
            return []
        q = np.frombuffer(b"".join(bytes.fromhex(f.pdq_hex) for f in frames), np.uint64)
        q = q.reshape(-1, _WORDS)
        n_query, n_entries = len(q), len(self.ids)
        compared = np.zeros(n_entries, np.int64)
        pairs = []  # entry * n_query + query frame, for each matching pair (repeats allowed)
        step = max(1, _PAIRS_PER_STEP // n_query)
        for start in range(0, self._words.shape[1], step):
            owner = self._owner[start : start + step]
            distances = np.zeros((n_query, len(owner)), np.uint16)
            for word in range(_WORDS):
                chunk = self._words[word, start : start + step]
                distances += np.bitwise_count(np.bitwise_xor.outer(q[:, word], chunk))
            close = distances <= distance_threshold
            compared += np.bincount(owner[close.any(axis=0)], minlength=n_entries)
            query_rows, frame_rows = np.nonzero(close)
            pairs.append(owner[frame_rows].astype(np.int64) * n_query + query_rows)
        matched = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
        queried = np.bincount(matched // n_query, minlength=n_entries).tolist()
        hits = compared.tolist()
        found = [
            (int(self.ids[e]), VpdqMatch(queried[e] * 100 / n_query, hits[e] * 100 / count))
            for e, count in enumerate(self._counts.tolist())
            if queried[e]
        ]
        found.sort(key=lambda f: (-f[1].query_match_percent, -f[1].compared_match_percent, f[0]))
        return found
