"""Each entry's SIFT keypoints, searchable: the :class:`~moderation.signals.local_features.
LocalIndex` of a blocklist, for a query's keypoints to be verified against (issue 15).

An entry imported with local features (``MODERATION_CLASSIFIER_LOCAL_FEATURES``) stores its
keypoints, packed by :func:`moderation.signals.local_features.pack`, as region rows after its
paste descriptor (:data:`KEYPOINT_ROW`: its :data:`~.paste_rows.ENTRY_WINDOW_ROWS` windows, then
the paste descriptor, then the keypoints), encrypted like the other region rows. Entries
imported before have none and are found by the other signals only.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from moderation.banks.paste_rows import ENTRY_WINDOW_ROWS
from moderation.signals.local_features import LOCAL_INDEX_MAX_ENTRIES, Keypoints, LocalIndex, unpack

if TYPE_CHECKING:
    from moderation.banks.blocklist import Blocklist
    from moderation.banks.snapshot_payload import Payload

KEYPOINT_ROW: Final = ENTRY_WINDOW_ROWS + 1
"""Position, among an entry's region rows, of its first packed keypoint row."""

logger = logging.getLogger(__name__)


def payload_keypoints(payload: Payload, keep: npt.NDArray[np.int64]) -> dict[int, Keypoints]:
    """The unpacked keypoints in ``payload``'s region rows of the entries in ``keep`` that have
    them (rows from :data:`KEYPOINT_ROW` on)."""
    owners = np.asarray(payload.region_entry_ids, np.int64)
    order = np.argsort(owners, kind="stable")
    ranked = owners[order]
    starts = np.searchsorted(ranked, ranked, side="left")
    rank = np.arange(len(ranked)) - starts
    picked = order[(rank >= KEYPOINT_ROW) & np.isin(ranked, keep)]
    picked.sort()
    if not len(picked):
        return {}
    rows = np.asarray(payload.region_vectors[picked], np.float32)
    ids = owners[picked]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    return {
        int(group[0]): unpack(block)
        for group, block in zip(np.split(ids, bounds), np.split(rows, bounds), strict=True)
    }


_cache: dict[int, tuple[weakref.ref[Blocklist], int, int, LocalIndex]] = {}
_lock = threading.Lock()


def local_index(blocklist: Blocklist) -> LocalIndex:
    """The :class:`LocalIndex` of the keypoints of ``blocklist``'s entries (snapshot and
    applied deltas), built once per blocklist version (a few per process are kept). More than
    :data:`~moderation.signals.local_features.LOCAL_INDEX_MAX_ENTRIES` entries with an
    embedding: an empty index (logged once per version)."""
    key = id(blocklist)
    stamp = (blocklist.version, len(blocklist.segments))
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached[0]() is blocklist and cached[1:3] == stamp:
            return cached[3]
    keep = np.fromiter((eid for eid in blocklist.entries if blocklist.has_vector(eid)), np.int64)
    if len(keep) > LOCAL_INDEX_MAX_ENTRIES:
        logger.warning(
            "v%s: %d entries with embeddings, more than the %d whose keypoints are indexed: "
            "local features find no pastes on this blocklist",
            blocklist.version,
            len(keep),
            LOCAL_INDEX_MAX_ENTRIES,
        )
        keep = keep[:0]
    found: dict[int, Keypoints] = {}
    for part in (blocklist.payload, *blocklist.segments):
        found.update(payload_keypoints(part, keep))
    index = LocalIndex(found)
    with _lock:
        for stale in [k for k, v in _cache.items() if v[0]() is None]:
            del _cache[stale]
        while len(_cache) >= 4:
            del _cache[next(iter(_cache))]
        _cache[key] = (weakref.ref(blocklist), *stamp, index)
    return index
