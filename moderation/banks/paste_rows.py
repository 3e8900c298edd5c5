"""Each entry's *paste descriptor*, searchable: what the entry looks like pasted small into
another picture, for the query's feature-map windows to be searched against.

A query window of the encoder's last feature map (:mod:`moderation.signals.encoders.
feature_windows`) covers a photo pasted at about 3/7 of the query's side: the network saw that
photo at 96 px, not at the 224 px its global embedding was computed at, and CNN features are not
scale-invariant. So the window is compared with the entry seen the same way: the entry resized
to 3 x 3 cells in the middle of a grey canvas, the same window of that canvas's feature map
(:func:`~moderation.signals.encoders.feature_windows.paste_canvas`). It is stored as one more
region row of the entry, after the :data:`ENTRY_WINDOW_ROWS` entry windows (entries imported
before it have none and are found by their global vector only).

Measured on photos-dev (60 entries; README "Feature-map windows"): share of edited copies whose
best window scored above every one of 60 unrelated photos' best window to any entry, windows
against the entries' global vectors / against their paste descriptors: feed-stories screenshot
0.55 / 0.95, story viewer 0.67 / 0.98, desktop lightbox 0.80 / 1.00, blurred-fill rotation
0.78 / 0.93, collage paste 0.17 / 0.70, paste anywhere 0.18 / 0.60, rotated feathered paste
0.08 / 0.35.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from moderation.banks.index.base import Hit

if TYPE_CHECKING:
    from moderation.banks.blocklist import Blocklist
    from moderation.banks.snapshot_payload import Payload

ENTRY_WINDOW_ROWS: Final = 5
"""Region rows of an entry before its paste descriptor: the classifier stage's five entry
windows (:data:`moderation.matching.classifier.regions.ENTRY_WINDOWS`)."""


PASTE_INDEX_MAX_ENTRIES: Final = 5_000
"""Most entries whose paste descriptors are searched: the search is exhaustive (25 windows x
entries x 1280 multiply-adds per query, about 0.3 GFLOP at this size), and the descriptors are
held in RAM (5 KB each). A bigger blocklist gets an empty paste index (logged once per
version): its pastes are found by the global vector and the straight-edge views only, until an
approximate index over the descriptors exists."""


class RowIndex:
    """Exhaustive inner-product search over float32 (m, d) unit ``vectors`` owned by int64 (m,)
    ``ids`` (one row per entry), answering like a cosine index."""

    def __init__(self, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        self.ids = np.asarray(ids, np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Per row of float32 (q, d) ``queries``, at most ``k`` hits with inner product at or
        above ``threshold``, best first."""
        matrix = np.asarray(queries, np.float32).reshape(-1, self.vectors.shape[1])
        if not len(self.ids) or not len(matrix) or k < 1:
            return [[] for _ in range(len(matrix))]
        # One matrix-vector product per query row, not one matrix product: OpenBLAS's threaded
        # GEMM waits for its threads while the screening pipeline's other thread runs (25
        # windows x 250 rows: 31 ms of wall time beside a busy thread, 1.3 ms as 25 GEMVs).
        scores = np.stack([self.vectors @ row for row in matrix])  # (q, m)
        k = min(k, len(self.ids))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for row, picks in zip(scores, top, strict=True):
            ranked = picks[np.argsort(-row[picks], kind="stable")]
            out.append(
                [Hit(int(self.ids[j]), float(row[j])) for j in ranked if row[j] >= threshold]
            )
        return out


def payload_paste_rows(
    payload: Payload, keep: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The paste descriptors in ``payload``'s region rows of the entries in ``keep``: each
    entry's row after its :data:`ENTRY_WINDOW_ROWS` windows, as (ids (m,), vectors (m, d))."""
    owners = np.asarray(payload.region_entry_ids, np.int64)
    order = np.argsort(owners, kind="stable")
    ranked = owners[order]
    starts = np.searchsorted(ranked, ranked, side="left")
    rank = np.arange(len(ranked)) - starts
    picked = order[(rank == ENTRY_WINDOW_ROWS) & np.isin(ranked, keep)]
    picked.sort()
    if not len(picked):
        return np.zeros(0, np.int64), np.zeros((0, payload.dim), np.float32)
    return owners[picked], np.asarray(payload.region_vectors[picked], np.float32)


logger = logging.getLogger(__name__)

Cached = TypeVar("Cached")


class VersionCache(Generic[Cached]):
    """One value per blocklist version (its snapshot version and applied deltas), built once
    and kept for the last :attr:`size` blocklists of the process (dead ones dropped first).
    Thread-safe; two threads may build the same value once each, the later one is kept."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._values: dict[int, tuple[weakref.ref[Blocklist], int, int, Cached]] = {}

    def get(self, blocklist: Blocklist, build: Callable[[Blocklist], Cached]) -> Cached:
        """The value for ``blocklist`` as it stands now, ``build(blocklist)`` when missing."""
        key = id(blocklist)
        stamp = (blocklist.version, len(blocklist.segments))
        with self._lock:
            cached = self._values.get(key)
            if cached is not None and cached[0]() is blocklist and cached[1:3] == stamp:
                return cached[3]
        value = build(blocklist)
        with self._lock:
            for stale in [k for k, v in self._values.items() if v[0]() is None]:
                del self._values[stale]
            while len(self._values) >= self.size:
                del self._values[next(iter(self._values))]
            self._values[key] = (weakref.ref(blocklist), *stamp, value)
        return value


def capped_entries(blocklist: Blocklist, cap: int, what: str) -> npt.NDArray[np.int64]:
    """int64 ids of ``blocklist``'s entries with an embedding (snapshot and applied deltas);
    none, with a warning naming ``what`` is lost, when there are more than ``cap``."""
    keep = np.fromiter((eid for eid in blocklist.entries if blocklist.has_vector(eid)), np.int64)
    if len(keep) > cap:
        logger.warning(
            "v%s: %d entries with embeddings, more than the %d whose %s",
            blocklist.version,
            len(keep),
            cap,
            what,
        )
        keep = keep[:0]
    return keep


_indexes: VersionCache[RowIndex] = VersionCache()


def paste_index(blocklist: Blocklist) -> RowIndex:
    """The :class:`RowIndex` of the paste descriptors of ``blocklist``'s entries with an
    embedding (snapshot and applied deltas), built once per blocklist version (a few per
    process are kept); empty past :data:`PASTE_INDEX_MAX_ENTRIES` entries (logged)."""
    return _indexes.get(blocklist, _build_paste_index)


def _build_paste_index(blocklist: Blocklist) -> RowIndex:
    keep = capped_entries(
        blocklist,
        PASTE_INDEX_MAX_ENTRIES,
        "paste descriptors are searched exhaustively: feature-map windows find no pastes on "
        "this blocklist",
    )
    parts = [payload_paste_rows(p, keep) for p in (blocklist.payload, *blocklist.segments)]
    return RowIndex(
        np.concatenate([ids for ids, _ in parts]), np.concatenate([v for _, v in parts])
    )
