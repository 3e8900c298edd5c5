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
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from moderation.banks.paste_rows import ENTRY_WINDOW_ROWS, VersionCache, capped_entries
from moderation.signals.local_features import LOCAL_INDEX_MAX_ENTRIES, Keypoints, LocalIndex, unpack

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

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


def keypoint_budget(session: Session) -> int:
    """How many more entries' keypoints an import should store: :data:`~moderation.signals.
    local_features.LOCAL_INDEX_MAX_ENTRIES` less the image entries already in the banks (at
    least 0). Past the cap the index is empty (:func:`local_index`), so keypoints stored then
    would be 14 region rows per entry (about 36 KB in float16) that nothing reads."""
    from sqlalchemy import func, select

    from moderation.storage.models import Entry

    count = session.scalar(select(func.count()).select_from(Entry).where(Entry.origin == "image"))
    return max(0, LOCAL_INDEX_MAX_ENTRIES - int(count or 0))


_indexes: VersionCache[LocalIndex] = VersionCache()


def local_index(blocklist: Blocklist) -> LocalIndex:
    """The :class:`LocalIndex` of the keypoints of ``blocklist``'s entries (snapshot and
    applied deltas), built once per blocklist version (a few per process are kept). More than
    :data:`~moderation.signals.local_features.LOCAL_INDEX_MAX_ENTRIES` entries with an
    embedding: an empty index (logged once per version)."""
    return _indexes.get(blocklist, _build_local_index)


def _build_local_index(blocklist: Blocklist) -> LocalIndex:
    keep = capped_entries(
        blocklist,
        LOCAL_INDEX_MAX_ENTRIES,
        "keypoints are indexed: local features find no pastes on this blocklist",
    )
    found: dict[int, Keypoints] = {}
    for part in (blocklist.payload, *blocklist.segments):
        found.update(payload_keypoints(part, keep))
    return LocalIndex(found)
