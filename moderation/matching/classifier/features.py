"""Pair features of the classifier stage: how a (query, entry) pair looks to each signal.

All features are plain floats named in :data:`FEATURE_NAMES`, so a pair can be stored as JSON
(:class:`~moderation.storage.models.LabelledPair` ``features``) and a model retrained without any
image. Vectors are float32 unit rows, so dot products are cosine similarities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from moderation.banks.blocklist import Blocklist
from moderation.banks.paste_rows import ENTRY_WINDOW_ROWS
from moderation.signals.pdq import PDQ_MIN_QUALITY, PdqHash

if TYPE_CHECKING:
    from moderation.signals.local_features import Keypoints

FEATURE_NAMES: tuple[str, ...] = (
    "cosine",
    "region_to_global",
    "global_to_region",
    "region_to_region",
    "pdq_similarity",
    "pdq_quality",
    "margin",
    "background_norm",
    "window_to_paste",
    "local_inliers",
)
"""The model's inputs, in order:

* ``cosine``: best global cosine over the query's frames.
* ``region_to_global``: best cosine of a query view (a pasted rectangle, the undone mosaic; see
  :mod:`moderation.matching.classifier.regions`) to the entry's global vector, at least ``cosine``.
* ``global_to_region``: best cosine of the query's global vector to one of the entry's stored
  windows, at least ``cosine`` (the query is a crop of the entry).
* ``region_to_region``: best of the above and of query view x entry window.
* ``pdq_similarity``: ``1 - d / 128`` clipped at 0, where d is the smallest PDQ Hamming distance
  over the query's dihedral variants and, when the views count, the views' hashes (unrelated
  images average 128 of 256 bits); 0 when either digest's quality is below ThreatExchange's 50.
* ``pdq_quality``: the lower of the two PDQ qualities, / 100.
* ``margin``: the best of the cosine features minus the best global cosine of the query to any
  other entry (the second-best entry), so a pair that stands out of the bank scores higher.
* ``background_norm``: ``cosine`` minus the mean of the query's 3 highest cosines to a
  background set of non-banned photos: the score normalisation of SSCD (Pizzi et al. 2022,
  arXiv:2202.10261, section 3.3), which on DISC21 lifts µAP from 0.61 to 0.72.
* ``window_to_paste``: best cosine of one of the query's feature-map windows (GeM pools of
  3 x 3-cell windows of the encoder's last feature map,
  :mod:`moderation.signals.encoders.feature_windows`) to the entry's paste descriptor (the entry
  seen pasted small, :mod:`moderation.banks.paste_rows`), at least ``cosine``; ``cosine`` when
  either side is missing (windows not computed, entry imported without the descriptor).
* ``local_inliers``: RANSAC inliers of the similarity transform from the entry's SIFT keypoints
  to the query's (:mod:`moderation.signals.local_features`), capped at
  :data:`LOCAL_INLIER_CAP` and divided by it; 0 when not verified (keypoints not computed, the
  entry imported without them, or not among the query's best-matching entries).

Models trained before ``window_to_paste`` or ``local_inliers`` existed
(:data:`LEGACY_FEATURE_SETS`) still load and read the first eight or nine columns; the other
features are computed as before.
"""

LEGACY_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES[:8]
"""The features of models stored before the feature-map windows (a prefix of the current)."""
LEGACY_FEATURE_SETS: tuple[tuple[str, ...], ...] = (LEGACY_FEATURE_NAMES, FEATURE_NAMES[:9])
"""Every older model's features: before the feature-map windows, before local features."""
LOCAL_INLIER_CAP = 30
"""Inliers at which ``local_inliers`` saturates at 1 (tuning pastes: median 28; unrelated
photos at most 5; README "Local features")."""

BACKGROUND_TOP = 3
"""Background neighbours averaged by ``background_norm`` (SSCD uses the k-th neighbour)."""
PDQ_RANDOM_DISTANCE = 128
"""Expected Hamming distance between PDQ digests of unrelated images (256 / 2 bits)."""


@dataclass(frozen=True)
class QuerySignals:
    """What the features look at for one query.

    ``vectors``: float32 (f, d), one unit row per frame. ``pdq``: per frame, the 8 dihedral
    variants. ``views``: float32 (v, d) embeddings of query views, or None when not computed (the
    query was outside the uncertain band). ``windows``: float32 (m, d) unit rows, the
    feature-map windows of every frame, or None when not computed. ``local``: RANSAC inliers
    per verified entry id (:meth:`moderation.signals.local_features.LocalIndex.verify`), or
    None when the query's keypoints were not computed. ``keypoints``: the query's own
    (training copies, verified against the bank when their candidates are searched), or None.
    """

    vectors: npt.NDArray[np.float32]
    pdq: tuple[tuple[PdqHash, ...], ...]
    views: npt.NDArray[np.float32] | None = None
    view_pdq: tuple[PdqHash, ...] = ()
    windows: npt.NDArray[np.float32] | None = None
    local: Mapping[int, int] | None = None
    keypoints: Keypoints | None = None


class RegionLookup:
    """Fast access to each entry's stored window vectors (float32 (r, d)) of one blocklist."""

    def __init__(self, blocklist: Blocklist) -> None:
        payload = blocklist.payload
        self._vectors = payload.region_vectors
        ids = payload.region_entry_ids
        order = np.argsort(ids, kind="stable")
        self._order = order
        sorted_ids = ids[order]
        unique, starts = np.unique(sorted_ids, return_index=True)
        ends = np.append(starts[1:], len(sorted_ids)) if len(starts) else starts
        self._spans = {
            int(e): (int(s), int(t)) for e, s, t in zip(unique, starts, ends, strict=True)
        }
        self._dim = payload.dim
        # Entries added by deltas applied in place live in the blocklist's segments.
        self._added = blocklist.segment_regions_of

    def rows(self, entry_id: int) -> npt.NDArray[np.float32]:
        """Every stored region row of the entry, float32 (r, d), in stored order."""
        span = self._spans.get(entry_id)
        if span is None:
            return self._added(entry_id)
        rows: npt.NDArray[np.float32] = self._vectors[self._order[span[0] : span[1]]]
        return rows

    def __call__(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The entry's windows, float32 (r, d), r <= :data:`ENTRY_WINDOW_ROWS`."""
        return self.rows(entry_id)[:ENTRY_WINDOW_ROWS]

    def paste(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The entry's paste descriptor (:mod:`moderation.banks.paste_rows`), float32 (1, d),
        or (0, d) for an entry imported without one."""
        return self.rows(entry_id)[ENTRY_WINDOW_ROWS : ENTRY_WINDOW_ROWS + 1]


def pdq_bits(pdq: Sequence[Sequence[PdqHash]]) -> tuple[npt.NDArray[np.bool_], int]:
    """Every frame's dihedral variants as bits, bool (v, 256), and the best variant quality."""
    variants = [variant for frame in pdq for variant in frame]
    if not variants:
        return np.zeros((0, 256), np.bool_), 0
    digests = np.stack([np.frombuffer(v.digest, np.uint8) for v in variants])
    return np.unpackbits(digests, axis=1).astype(np.bool_), max(v.quality for v in variants)


def pdq_distance(bits: npt.NDArray[np.bool_], digest: bytes) -> int:
    """Smallest Hamming distance (bits) from ``digest`` to any row of ``bits`` (from
    :func:`pdq_bits`); 256 when there is no row."""
    if len(bits) == 0:
        return 256
    target = np.unpackbits(np.frombuffer(digest, np.uint8)).astype(np.bool_)
    return int(np.count_nonzero(bits != target, axis=1).min())


def background_mean(vectors: npt.NDArray[np.float32], background: npt.NDArray[np.float32]) -> float:
    """Mean of the :data:`BACKGROUND_TOP` highest cosines of the frames to the background set
    (the best frame's); 0.0 without a background."""
    if len(background) == 0 or len(vectors) == 0:
        return 0.0
    sims = vectors @ background.T  # (f, b)
    top = np.sort(sims, axis=1)[:, -BACKGROUND_TOP:]
    return float(top.mean(axis=1).max())


def second_best(
    blocklist: Blocklist, vectors: npt.NDArray[np.float32], exclude: Iterable[int]
) -> dict[int, float]:
    """For the best few entries by global cosine (``exclude`` left out), the best cosine of any
    *other* entry, keyed by entry id; key -1 holds the best of all, for entries further down."""
    excluded = set(exclude)
    k = min(len(blocklist), len(excluded) + 3)
    if k == 0:
        return {}
    best: dict[int, float] = {}
    for hits in blocklist.cosine.search(vectors, k, -1.0):
        for hit in hits:
            if hit.id in excluded:
                continue
            best[int(hit.id)] = max(best.get(int(hit.id), -1.0), float(hit.score))
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    out: dict[int, float] = {}
    for entry_id, _ in ranked:
        others = [score for other, score in ranked if other != entry_id]
        out[entry_id] = others[0] if others else 0.0
    out[-1] = ranked[0][1] if ranked else 0.0  # the best entry of all, for anyone else
    return out


def pair_features(
    query: QuerySignals,
    entry_id: int,
    blocklist: Blocklist,
    regions: RegionLookup,
    *,
    runner_up: dict[int, float],
    background_score: float,
    use_views: bool,
    bits: tuple[npt.NDArray[np.bool_], int] | None = None,
) -> dict[str, float]:
    """The :data:`FEATURE_NAMES` of the pair (query, entry ``entry_id``).

    Args:
        runner_up: from :func:`second_best` for this query.
        background_score: from :func:`background_mean` for this query.
        use_views: whether the query views count (the query is in the uncertain band).
        bits: :func:`pdq_bits` of ``query.pdq`` when already computed.
    """
    stored = blocklist.vector_of(entry_id)
    cosine = float(np.max(query.vectors @ stored))
    windows = regions(entry_id)
    views = query.views if use_views and query.views is not None else None
    global_to_region = cosine
    if len(windows):
        global_to_region = max(cosine, float(np.max(query.vectors @ windows.T)))
    region_to_global = cosine
    region_to_region = global_to_region
    if views is not None and len(views):
        region_to_global = max(cosine, float(np.max(views @ stored)))
        region_to_region = max(region_to_global, global_to_region)
        if len(windows):
            region_to_region = max(region_to_region, float(np.max(views @ windows.T)))
    digest, entry_quality = blocklist.pdq_of(entry_id)
    variant_bits, query_quality = bits if bits is not None else pdq_bits(query.pdq)
    if views is not None and query.view_pdq:
        view_bits, view_quality = pdq_bits((query.view_pdq,))
        variant_bits = np.concatenate([variant_bits, view_bits])
        query_quality = max(query_quality, view_quality)
    distance = pdq_distance(variant_bits, digest)
    quality = min(entry_quality, query_quality)
    pdq_similarity = max(0.0, 1.0 - distance / PDQ_RANDOM_DISTANCE)
    if quality < PDQ_MIN_QUALITY:
        pdq_similarity = 0.0
    window_to_paste = _window_to_paste(query, regions, entry_id, cosine)
    other = runner_up.get(entry_id, runner_up.get(-1, 0.0))
    return {
        "cosine": cosine,
        "region_to_global": region_to_global,
        "global_to_region": global_to_region,
        "region_to_region": region_to_region,
        "pdq_similarity": pdq_similarity,
        "pdq_quality": quality / 100.0,
        "margin": max(cosine, region_to_global, global_to_region) - other,
        "background_norm": cosine - background_score,
        "window_to_paste": window_to_paste,
        "local_inliers": local_inliers(query, entry_id),
    }


def local_inliers(query: QuerySignals, entry_id: int) -> float:
    """The ``local_inliers`` feature: the entry's RANSAC inliers, min(n, cap) / cap, in [0, 1]."""
    inliers = 0 if query.local is None else query.local.get(entry_id, 0)
    return min(inliers, LOCAL_INLIER_CAP) / LOCAL_INLIER_CAP


def _window_to_paste(
    query: QuerySignals, regions: RegionLookup, entry_id: int, cosine: float
) -> float:
    """The best cosine of the query's feature-map windows to the entry's paste descriptor,
    at least ``cosine`` (the global one; also when either is missing)."""
    if query.windows is None or not len(query.windows):
        return cosine
    paste = regions.paste(entry_id)
    if not len(paste):
        return cosine
    return max(cosine, float(np.max(query.windows @ paste[0])))


def query_features(
    query: QuerySignals,
    entry_ids: Sequence[int],
    blocklist: Blocklist,
    regions: RegionLookup,
    *,
    background: npt.NDArray[np.float32],
    exclude: Sequence[int] = (),
    use_views: bool = True,
) -> list[dict[str, float]]:
    """Feature rows for (query, each of ``entry_ids``), as if ``exclude`` were not in the bank
    (training: leaving the query's own source out makes its other candidates the negatives of a
    non-member query). ``background``: float32 (b, d) unit rows of the background set."""
    runner_up = second_best(blocklist, query.vectors, exclude)
    background_score = background_mean(query.vectors, background)
    bits = pdq_bits(query.pdq)
    return [
        pair_features(
            query,
            entry_id,
            blocklist,
            regions,
            runner_up=runner_up,
            background_score=background_score,
            use_views=use_views,
            bits=bits,
        )
        for entry_id in entry_ids
    ]


def feature_matrix(rows: Sequence[dict[str, float]]) -> npt.NDArray[np.float64]:
    """Rows of feature dicts as a float64 (n, len(FEATURE_NAMES)) matrix.

    Raises:
        KeyError: a row lacks a feature.
    """
    return np.array([[float(row[name]) for name in FEATURE_NAMES] for row in rows], np.float64)
