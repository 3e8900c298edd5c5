"""The classifier stage of screening: candidates -> pair features -> calibrated probability.

:class:`ClassifierStage` implements :class:`moderation.matching.candidates.CandidateRefiner`.
Extra work happens only on queries that have candidates, and the one costly step, embedding
query views, only on queries in the uncertain band (:class:`Band`): the best candidate is
neither a clear copy (global cosine at or above ``band.high``, or a PDQ match at or below
``band.certain_pdq``) nor clearly nothing (best cosine below ``band.low``). Queries in the
narrower :class:`WindowBand` also get a grid of multi-scale windows
(:func:`~moderation.matching.classifier.regions.query_windows`). Views and windows of a whole
batch are embedded in one encoder call. With ``feature_windows`` the screener also hands over
each frame's feature-map windows, pooled from the same encoder pass as the global embedding
(:mod:`moderation.signals.encoders.feature_windows`): they retrieved candidates in stage 1 and
give the ``window_to_paste`` feature, at no extra model pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.banks.blocklist import Blocklist
from moderation.matching.classifier.features import (
    QuerySignals,
    RegionLookup,
    feature_matrix,
    query_features,
)
from moderation.matching.classifier.model import CopyModel
from moderation.matching.classifier.regions import query_views, query_windows
from moderation.signals.local_features import CANDIDATE_INLIERS
from moderation.signals.pdq import PdqHash, pdq_hash

if TYPE_CHECKING:
    from moderation.matching.candidates import Candidate, QueryContext
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)

SIGNAL_THRESHOLD = 0.70
"""A cosine feature at or above this counts as an agreeing signal in explanations (display
only; decisions rest on the probability). The default policy's review cosine."""
PDQ_SIGNAL_DISTANCE = 31
"""A PDQ distance at or below this counts as an agreeing signal (ThreatExchange's match)."""


@dataclass(frozen=True)
class Band:
    """The uncertain band: queries whose best candidate falls here get their views embedded.

    ``low``/``high`` are global cosines; ``certain_pdq`` a PDQ Hamming distance (bits). The
    defaults come from the benchmark's global-cosine scores (``moderation benchmark --images
    ../shared/data/photos-dev``, default encoder): the edited copies that need a view (pasted
    into a screenshot or onto another photo) scored 0.52-0.82 with their best entry, no negative
    query reached 0.71, and 48% of all queries fall in [0.50, 0.80). Pixelised copies score
    lower but match on PDQ.
    """

    low: float = 0.50
    high: float = 0.80
    certain_pdq: int = 16

    def uncertain(
        self, best_cosine: float, best_pdq: int | None, verified_locally: bool = False
    ) -> bool:
        """Whether a query with these best signals needs its views. A query whose keypoints
        were verified (``verified_locally``: local features, ``QueryContext.local``) gets
        none: SIFT finds the pastes and screenshots the straight-edge views are for, and the
        views' detection and encoder pass cost 0.58 -> 0.48 of the global-cosine throughput
        with local features on (README "Local features instead of views")."""
        if verified_locally or (best_pdq is not None and best_pdq <= self.certain_pdq):
            return False
        return self.low <= best_cosine < self.high


@dataclass(frozen=True)
class WindowBand:
    """Queries whose best global cosine lies in ``[low, high)`` (and that have no PDQ match
    within ``certain_pdq``) also get their query windows embedded, as extra views.

    ``high`` is the default policy's ``block_cosine`` (0.78): above it the global embedding
    decides. ``low`` is its ``review_cosine`` (0.70) minus a margin of 0.10: pasted and
    screenshotted copies sit just below review, where a window lifts them. Each query in the
    band costs one embedding per window (14), so the band is kept narrow. Off unless
    ``enabled`` (``MODERATION_CLASSIFIER_WINDOWS=true``): on the benchmark they raised recall at
    precision 0.99 from 0.982 to 0.994 but cost 38% of the classifier stage's throughput and
    blocked one unrelated photo (README "Query windows").
    """

    low: float = 0.60
    high: float = 0.78
    certain_pdq: int = 16
    enabled: bool = False

    def contains(self, best_cosine: float, best_pdq: int | None) -> bool:
        """Whether a query with these best signals gets its windows."""
        if not self.enabled or (best_pdq is not None and best_pdq <= self.certain_pdq):
            return False
        return self.low <= best_cosine < self.high


class PdqMemo:
    """PDQ hashes of images already hashed in this batch (the chosen view was hashed once
    while ranking crops). Keyed by object, holding the image so an id is never reused."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Image.Image, PdqHash]] = {}

    def __call__(self, image: Image.Image) -> PdqHash:
        """``pdq_hash(image)``, computed once per image object."""
        cached = self._seen.get(id(image))
        if cached is not None and cached[0] is image:
            return cached[1]
        value = pdq_hash(image)
        self._seen[id(image)] = (image, value)
        return value


def bank_pdq_rank(
    blocklist: Blocklist, memo: PdqMemo | None = None
) -> Callable[[list[Image.Image]], list[float]]:
    """Ranks crops by the PDQ distance (bits) of each to its nearest bank entry (256: none)."""
    hasher = memo if memo is not None else pdq_hash

    def rank(crops: list[Image.Image]) -> list[float]:
        if len(blocklist) == 0:
            return [256.0] * len(crops)
        digests = np.stack([np.frombuffer(hasher(c).digest, np.uint8) for c in crops])
        hits = blocklist.pdq.search(digests, 1, 256)
        return [float(h[0].score) if h else 256.0 for h in hits]

    return rank


def view_images(
    frames: Sequence[Image.Image],
    frame: int,
    max_views: int,
    rank: Callable[[list[Image.Image]], list[float]] | None = None,
) -> list[Image.Image]:
    """The views of the query frame the best candidate matched (see ``regions.query_views``)."""
    return [image for _, image in query_views(frames[frame], max_views=max_views, rank=rank)]


def embed_views(
    encoder: Encoder, wanted: Sequence[Sequence[Image.Image]], *, batch_size: int
) -> list[npt.NDArray[np.float32]]:
    """Each query's view embeddings, float32 (v_i, d) (v_i may be 0), from one encoder pass over
    all the views."""
    flat = [image for images in wanted for image in images]
    vectors = encoder.encode(flat, batch_size=batch_size) if flat else None
    out: list[npt.NDArray[np.float32]] = []
    offset = 0
    for images in wanted:
        if vectors is None or not images:
            out.append(np.zeros((0, encoder.dim), np.float32))
            continue
        out.append(vectors[offset : offset + len(images)])
        offset += len(images)
    return out


def flat_windows(windows: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32] | None:
    """Every frame's feature-map windows (f, w, d) as rows (f * w, d); None stays None."""
    return None if windows is None else windows.reshape(-1, windows.shape[-1])


def agreed_signals(features: dict[str, float]) -> list[str]:
    """Names of the signals that, alone, point at a copy (for the explanation): a feature row,
    with the entry's RANSAC ``inliers`` when the query's keypoints were verified
    (``local_features`` agrees at :data:`~moderation.signals.local_features.CANDIDATE_INLIERS`,
    the count that makes an entry a candidate)."""
    agreed = []
    if features["cosine"] >= SIGNAL_THRESHOLD:
        agreed.append("global_cosine")
    if features["region_to_global"] >= SIGNAL_THRESHOLD and (
        features["region_to_global"] > features["cosine"]
    ):
        agreed.append("query_region")
    if features["global_to_region"] >= SIGNAL_THRESHOLD and (
        features["global_to_region"] > features["cosine"]
    ):
        agreed.append("entry_region")
    if features["window_to_paste"] >= SIGNAL_THRESHOLD and (
        features["window_to_paste"] > features["cosine"]
    ):
        agreed.append("feature_window")
    if features["pdq_similarity"] >= 1.0 - PDQ_SIGNAL_DISTANCE / 128:
        agreed.append("pdq")
    if features.get("inliers", 0.0) >= CANDIDATE_INLIERS:
        agreed.append("local_features")
    return agreed


class ClassifierStage:
    """Scores candidates with a :class:`CopyModel`; embeds query views only in the band.

    Args:
        model: the active model (its ``version`` is recorded on every result).
        encoder: embeds query views; must be the model's encoder.
        band: the uncertain band.
        windows: the window band (:class:`WindowBand`; default: its defaults, off).
        max_views: views embedded per uncertain query at most.
        batch_size: encoder batch size for views.
        feature_windows: whether the screener should compute the frames' feature-map windows
            (a candidate source and the ``window_to_paste`` feature; ignored by encoders
            without them).
        local_features: whether the screener should verify the query's SIFT keypoints against
            the entries' (a candidate source and the ``local_inliers`` feature).
    """

    def __init__(
        self,
        model: CopyModel,
        encoder: Encoder,
        *,
        band: Band | None = None,
        windows: WindowBand | None = None,
        max_views: int = 1,
        batch_size: int = 32,
        feature_windows: bool = True,
        local_features: bool = False,
    ) -> None:
        self.model = model
        self.feature_windows = feature_windows
        self.local_features = local_features
        self.version = model.version
        self.encoder = encoder
        self.band = band or Band()
        self.windows = windows or WindowBand()
        self.max_views = max_views
        self.batch_size = batch_size
        self._regions: tuple[int, RegionLookup] | None = None

    def regions(self, blocklist: Blocklist) -> RegionLookup:
        """The window lookup of ``blocklist`` (built once per blocklist object)."""
        if self._regions is None or self._regions[0] != id(blocklist):
            self._regions = (id(blocklist), RegionLookup(blocklist))
        return self._regions[1]

    def _embed_views(self, wanted: Sequence[list[Image.Image]]) -> list[npt.NDArray[np.float32]]:
        return embed_views(self.encoder, wanted, batch_size=self.batch_size)

    def refine_batch(
        self, items: Sequence[tuple[QueryContext, list[Candidate]]], blocklist: Blocklist
    ) -> None:
        """Set ``probability``, ``features`` and ``signals`` on every candidate in place.

        Candidates without an embedding (hash-list entries: PDQ or exact hashes only) are left
        as they are: the policy decides them on their PDQ distance or exact match."""
        items = [
            (query, scored)
            for query, cands in items
            if (scored := [c for c in cands if blocklist.has_vector(c.entry.entry_id)])
        ]
        memo = PdqMemo()
        wanted, windowed = self._wanted_views(items, blocklist, memo)
        views = self._embed_views(wanted)
        regions = self.regions(blocklist)
        for (query, cands), vectors, asked, n_windows in zip(
            items, views, wanted, windowed, strict=True
        ):
            # Windows come last in ``asked``; only the detected views are PDQ-hashed.
            detected = asked[: len(asked) - n_windows]
            view_pdq = tuple(memo(view) for view in detected)
            signals = QuerySignals(
                query.vectors,
                query.pdq,
                vectors,
                view_pdq,
                flat_windows(query.windows),
                query.local,
            )
            rows = self.features(signals, [c.entry.entry_id for c in cands], blocklist, regions)
            probabilities = self.model.predict(feature_matrix(rows))
            for cand, row, probability in zip(cands, rows, probabilities, strict=True):
                cand.probability = float(probability)
                cand.features = dict(row, views=float(len(detected)), windows=float(n_windows))
                if query.local is not None:
                    cand.features["inliers"] = float(query.local.get(cand.entry.entry_id, 0))
                cand.signals = [*agreed_signals(cand.features), "classifier"]

    def _wanted_views(
        self,
        items: Sequence[tuple[QueryContext, list[Candidate]]],
        blocklist: Blocklist,
        memo: PdqMemo,
    ) -> tuple[list[list[Image.Image]], list[int]]:
        """Per query, the images to embed as views (detected views, then the query windows
        when in the window band) and how many of them are windows."""
        wanted: list[list[Image.Image]] = []
        windowed: list[int] = []
        rank = bank_pdq_rank(blocklist, memo)
        for query, cands in items:
            best = max(cands, key=lambda c: c.cosine or -1.0)
            pdqs = [c.pdq_distance for c in cands if c.pdq_distance is not None]
            best_cos, best_pdq = best.cosine or -1.0, min(pdqs) if pdqs else None
            images: list[Image.Image] = []
            if self.band.uncertain(best_cos, best_pdq, query.local is not None):
                images = view_images(query.frames, best.frame, self.max_views, rank)
            windows: list[Image.Image] = []
            if self.windows.contains(best_cos, best_pdq):
                windows = query_windows(query.frames[best.frame])
            wanted.append([*images, *windows])
            windowed.append(len(windows))
        return wanted, windowed

    def features(
        self,
        query: QuerySignals,
        entry_ids: Sequence[int],
        blocklist: Blocklist,
        regions: RegionLookup | None = None,
        *,
        exclude: Sequence[int] = (),
        use_views: bool = True,
    ) -> list[dict[str, float]]:
        """Feature rows for (query, each of ``entry_ids``), as if ``exclude`` were not in the bank
        (training: the query's own source left out makes its other candidates the negatives of
        a non-member query)."""
        return query_features(
            query,
            entry_ids,
            blocklist,
            regions or self.regions(blocklist),
            background=self.model.background,
            exclude=exclude,
            use_views=use_views,
        )
