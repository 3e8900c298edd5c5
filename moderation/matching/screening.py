"""The screening pipeline: decode -> embed + PDQ -> search -> classify -> decide -> record.

:class:`Screener` holds the injected collaborators (encoder, decrypted blocklist, policy,
decode limits, optional classifier stage) and screens a batch of uploads in one pass so the
encoder runs at full batch size. The stages live beside it: candidate search in
:mod:`moderation.matching.candidates`, the policy's rules in :mod:`moderation.matching.decision`,
and :func:`moderation.matching.recording.record_result` writes a result to the database. The
CLI, the Celery task and the tests all call the Screener and record_result (STYLE.md rule 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from moderation.banks.blocklist import Blocklist
from moderation.banks.keypoint_rows import local_index
from moderation.banks.paste_rows import paste_index
from moderation.banks.shard_index import ShardedCosineIndex
from moderation.matching.candidates import (
    EVERY_BANK,
    Candidate,
    CandidateRefiner,
    QueryContext,
    Scope,
    exact_candidates,
    find_candidates,
    merge_verified,
    pdq_query_rows,
    vpdq_candidates,
)
from moderation.matching.decision import (
    ScreeningResult,
    allow_bank_hit,
    candidate_summary,
    policy_matches,
    top_match_outcome,
)
from moderation.matching.policy import Policy
from moderation.matching.preparing import (
    DRAFT_SIZE,
    Prepared,
    Preparer,
    Work,
    elapsed_ms,
    embed_works,
)
from moderation.matching.video import video_explanation, with_timestamps
from moderation.media.decode import DecodeLimits, UnscannableImage
from moderation.media.video import DEFAULT_VIDEO_LIMITS, VideoLimits
from moderation.signals import local_features
from moderation.signals.encoders import Encoder
from moderation.signals.exact import keyed_digests

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


class Screener:
    """Screens uploads against one decrypted blocklist under one policy.

    Args:
        encoder: embeds frames; its id must equal ``blocklist.encoder_id``.
        blocklist: the decrypted, in-memory snapshot.
        policy: decision rules.
        limits: decode limits.
        batch_size: frames per encoder call.
        refiner: the classifier stage, or None for global cosine + PDQ only.
        draft_size: JPEG draft target (px) as (long side, short side): large JPEGs decode at
            reduced scale, never below it; (512, 224) serves PDQ (long side 512) and the
            224 x 224 encoder input from one decode.
        video_limits: limits and sampling for MP4, MOV and WebM uploads, whose sampled frames
            are screened like an animation's (:mod:`moderation.matching.video`).

    Raises:
        ValueError: the encoder and the blocklist disagree (embedding drift).
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        blocklist: Blocklist,
        policy: Policy,
        limits: DecodeLimits,
        batch_size: int = 32,
        refiner: CandidateRefiner | None = None,
        draft_size: tuple[int, int] | None = DRAFT_SIZE,
        video_limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
    ) -> None:
        if str(encoder.id) != blocklist.encoder_id:
            raise ValueError(
                f"encoder {encoder.id} differs from the snapshot's encoder {blocklist.encoder_id}"
            )
        self.encoder = encoder
        self.blocklist = blocklist
        self.policy = policy
        self.limits = limits
        self.batch_size = batch_size
        self.refiner = refiner
        self.draft_size = draft_size
        self.video_limits = video_limits
        self.preparer = Preparer(encoder, limits, draft_size, video_limits)
        self.verifier = local_features.BackgroundVerifier()

    # --- pipeline stages ------------------------------------------------------------------

    def _exact(self, work: Work) -> None:
        """Exact-hash candidates: the upload's keyed MD5/SHA-1/SHA-256 against the hash-list
        entries (only when the blocklist has any; from the bytes, so an undecodable file that
        is on a list still matches)."""
        key = self.blocklist.exact_key
        if key is not None:
            digests = keyed_digests(key, work.data)
            with self.blocklist.guard:  # a delta may be applied meanwhile (worker watcher)
                work.exact = exact_candidates(self.blocklist, digests, work.scope)

    @property
    def feature_windows(self) -> bool:
        """Whether frames get feature-map windows (:mod:`.feature_windows`) from the encoder
        pass: the classifier stage asks for them and the encoder has them."""
        wanted = bool(getattr(self.refiner, "feature_windows", False))
        return wanted and self.encoder.has_feature_windows

    def _embed(self, works: Sequence[Work]) -> None:
        """Embed the works a pipeline did not embed early (:meth:`Preparer.embed`)."""
        embed_works(self.encoder, works, windows=self.feature_windows, batch_size=self.batch_size)

    def _search(self, work: Work) -> list[Candidate]:
        assert work.vectors is not None
        start = time.perf_counter()
        found = find_candidates(
            self.blocklist,
            self._policy(work).candidates,
            work.vectors,
            work.pdq,
            work.exact,
            work.scope,
            windows=work.windows,
            window_index=None if work.windows is None else paste_index(self.blocklist),
        )
        if work.video is not None and len(self.blocklist.vpdq):
            rules = self._policy(work).candidates
            found += vpdq_candidates(self.blocklist, work.video.vpdq, rules, work.scope)
        work.timings["search"] = work.timings.get("search", 0.0) + elapsed_ms(start)
        return found

    def _verify_local(
        self, works: Sequence[Work], found: Sequence[list[Candidate]]
    ) -> list[list[Candidate]]:
        """``found`` with, for each upload the classifier stage wants local features for (no
        candidate already above :data:`~moderation.signals.local_features.SKIP_COSINE`), the
        entries its first frame's keypoints verified (``work.local``) merged in. Background
        verifications (:meth:`prepare`) of the other uploads are cancelled first; the screener
        thread then takes the wanted ones from the back of the batch, running itself those the
        background thread has not started, so both cores verify. The time is shared out as
        search time."""
        start = time.perf_counter()
        wanted = [self._wants_local(w, f) for w, f in zip(works, found, strict=True)]
        index = local_index(self.blocklist) if any(wanted) else None
        if index is not None and not len(index):
            wanted, index = [False] * len(works), None
        jobs: list[tuple[int, Future[local_features.Verified] | None]] = []
        for at, (work, want) in enumerate(zip(works, wanted, strict=True)):
            pending, work.verifying = work.verifying, None
            if want:
                jobs.append((at, pending))
            elif pending is not None:
                pending.cancel()
        out = list(found)
        for at, pending in reversed(jobs):
            work = works[at]
            assert index is not None and work.decoded is not None and work.vectors is not None
            work.local = _inliers(work.decoded.frames[0], pending, index)
            out[at] = merge_verified(self.blocklist, out[at], work.vectors, work.local, work.scope)
        share = elapsed_ms(start) / max(len(jobs), 1)
        for at, _ in jobs:
            works[at].timings["search"] = works[at].timings.get("search", 0.0) + share
        return out

    def _speculate(self, index: local_features.LocalIndex, work: Work) -> None:
        """Start ``work``'s local features on :attr:`verifier`'s thread before its search
        says whether they are wanted, unless its first frame is a PDQ match of an entry (within
        the policy's ``max_pdq_distance``, 31 by default; quality >= ``min_pdq_quality``): such
        a copy's cosine is nearly always above the skip cosine, so the work would be lost. A
        query left out that turns out wanted is verified in the search."""
        assert work.decoded is not None
        rules = self._policy(work).candidates
        digests = pdq_query_rows(work.pdq[0], rules.min_pdq_quality)
        if digests is not None and len(self.blocklist.pdq):
            with self.blocklist.guard:
                hits = self.blocklist.pdq.search(digests, 1, rules.max_pdq_distance)
            if any(hits):
                return
        work.verifying = self.verifier.submit(work.decoded.frames[0], index)

    def _wants_local(self, work: Work, found: list[Candidate]) -> bool:
        """Whether ``work`` gets local features: the classifier stage asks for them, it was
        decoded, and none of ``found`` is above the skip cosine (:func:`.local_features.
        wanted`)."""
        if not self._local_features or work.decoded is None:
            return False
        return local_features.wanted(max((c.cosine or -1.0 for c in found), default=None))

    def _prefetch(self, works: Sequence[Work]) -> None:
        """With a sharded cosine index (:mod:`moderation.banks.shard_index`), search the whole
        batch's frames in one round trip to the shards, at the widest of the batch's policies
        (most hits, lowest cosine floor); each upload's search is then answered from it. Its
        time is shared out as search time."""
        cosine = self.blocklist.cosine
        searched = [w for w in works if w.vectors is not None]
        if not isinstance(cosine, ShardedCosineIndex) or not searched:
            return
        start = time.perf_counter()
        rules = [self._policy(w).candidates for w in searched]
        rows = [w.vectors for w in searched if w.vectors is not None]
        k, floor = max(r.top_k for r in rules), min(r.min_cosine for r in rules)
        windows = [
            w.windows.reshape(-1, w.windows.shape[-1]) for w in searched if w.windows is not None
        ]
        if windows:  # the feature-map windows' searches too, in the same round trip
            rows += windows
            k = max(k, *(r.window_top_k for r in rules))
            floor = min(floor, *(r.min_window_cosine for r in rules))
        cosine.prefetch(np.concatenate(rows), k, floor)
        share = elapsed_ms(start) / len(searched)
        for work in searched:
            work.timings["search"] = share

    def _nearest(self, vectors: npt.NDArray[np.float32], found: list[Candidate]) -> float | None:
        """The cosine of the nearest bank entry to any frame, however far (the candidates'
        best when one was retrieved, else a top-1 search): drift monitoring's upload-embedding
        signal (:mod:`moderation.modelops.drift`). None for an empty cosine index."""
        cosines = [c.cosine for c in found if c.cosine is not None]
        if cosines:
            return max(cosines)
        hits = [h.score for frame in self.blocklist.cosine.search(vectors, 1, -1.0) for h in frame]
        return float(max(hits)) if hits else None

    def _classify(self, works: Sequence[Work], found: Sequence[list[Candidate]]) -> None:
        """Run the classifier stage once over the batch; its time is shared out per upload."""
        pending = [
            (work, cands)
            for work, cands in zip(works, found, strict=True)
            if cands and work.decoded
        ]
        for work in works:
            work.timings["classify"] = 0.0
        if self.refiner is None or not pending:
            return
        start = time.perf_counter()
        items = []
        for work, cands in pending:
            assert work.decoded is not None and work.vectors is not None
            context = QueryContext(
                work.decoded.frames, work.vectors, work.pdq, work.windows, work.local
            )
            items.append((context, cands))
        self.refiner.refine_batch(items, self.blocklist)
        share = elapsed_ms(start) / len(pending)
        for work, _ in pending:
            work.timings["classify"] = share

    # --- decision -------------------------------------------------------------------------

    def _policy(self, work: Work) -> Policy:
        """The upload's client's policy, else the screener's."""
        return work.scope.policy or self.policy

    def decide(self, work: Work, candidates: list[Candidate]) -> ScreeningResult:
        """Apply the policy (the upload's client's, else the screener's) to its candidates."""
        policy = self._policy(work)
        base: dict[str, Any] = {
            "policy": policy.name,
            "encoder_id": self.blocklist.encoder_id,
            "index_version": self.blocklist.version,
            "classifier_version": self.refiner.version if self.refiner else None,
        }
        if work.error is not None and not candidates:
            return self._unscannable_result(work, work.error, base)
        start = time.perf_counter()
        decoded = work.decoded
        block_cands = [c for c in candidates if c.entry.bank_kind == "block"]
        allow_cands = [c for c in candidates if c.entry.bank_kind == "allow"]
        matches = policy_matches(policy, block_cands)
        if work.video is not None:
            matches = with_timestamps(work.video, matches)
        best_block = max((c.ranking_score for c in block_cands), default=None)
        explanation: dict[str, Any] = {
            "frames": len(decoded.frames) if decoded else 0,
            "frame_indices": list(decoded.frame_indices) if decoded else [],
            "candidates": candidate_summary(candidates),
        }
        if work.nearest is not None:
            explanation["nearest_cosine"] = round(work.nearest, 4)
        if work.error is not None:  # undecodable, but its bytes are on a hash list
            explanation["undecodable"] = work.error.reason
        if work.video is not None:
            explanation["video"] = video_explanation(work.video, matches)
        allow_hit = allow_bank_hit(policy, allow_cands)
        decision, reason, category, priority = "allow", None, None, None
        hold_days: int | None = None
        if matches:
            decision, category, priority, hold_days, explained = top_match_outcome(
                policy, matches[0]
            )
            explanation.update(explained)
        if allow_hit is not None and (best_block is None or allow_hit.ranking_score >= best_block):
            if matches:
                explanation["suppressed_by_allow_bank"] = {
                    "entry_id": allow_hit.entry.public_id,
                    "bank": allow_hit.entry.bank_name,
                    "cosine": allow_hit.cosine,
                }
            decision, reason, category, priority, matches = "allow", "allow_bank", None, None, []
            hold_days = None
        work.timings["decide"] = elapsed_ms(start)
        return ScreeningResult(
            decision=decision,
            score=best_block,
            reason=reason,
            category=category,
            matches=tuple(matches),
            timings_ms=self._total(work.timings),
            review_priority=priority,
            explanation=explanation,
            legal_hold_days=hold_days,
            **base,
        )

    def _unscannable_result(
        self, work: Work, error: UnscannableImage, base: dict[str, Any]
    ) -> ScreeningResult:
        policy = self._policy(work)
        action = policy.unscannable_decision
        return ScreeningResult(
            decision="unscannable",
            score=None,
            reason=error.reason,
            category=None,
            matches=(),
            timings_ms=self._total(work.timings),
            review_priority=policy.unscannable_priority if action == "review" else None,
            explanation={"unscannable_action": action, "detail": error.detail},
            **base,
        )

    @staticmethod
    def _total(timings: dict[str, float]) -> dict[str, float]:
        ordered = {k: timings.get(k, 0.0) for k in ("decode", "pdq", "embed", "search", "classify")}
        ordered["total"] = sum(timings.values())
        return ordered

    # --- entry points ---------------------------------------------------------------------

    def screen_bytes(
        self, items: Sequence[bytes], scopes: Sequence[Scope] | None = None
    ) -> list[ScreeningResult]:
        """Screen a batch of encoded images (one result per item, same order); ``scopes`` (one
        per item) limits each to its client's banks and policy (default: every bank, the
        screener's policy).

        Never raises for bad images: they end ``unscannable`` with a reason.
        """
        return self.finish(self.prepare(items, scopes))

    @property
    def _local_features(self) -> bool:
        """Whether the classifier stage asks for local features."""
        return bool(getattr(self.refiner, "local_features", False))

    def prepare(self, items: Sequence[bytes], scopes: Sequence[Scope] | None = None) -> Prepared:
        """The CPU-side first half of :meth:`screen_bytes`: decode, PDQ and the encoder's
        preprocessing (:class:`~moderation.matching.preparing.Preparer`; thread-safe and
        GIL-light, so a pipeline runs it for the next batch while :meth:`finish` embeds this
        one: :func:`moderation.service.operations.screen_paths`). When the classifier stage
        asks for local features and the bank has keypoints, each upload is verified on
        :attr:`verifier`'s thread from its PDQ on, beside the rest (:meth:`_speculate`)."""
        hook = None
        if self._local_features:
            with self.blocklist.guard:
                index = local_index(self.blocklist)
            if len(index):
                hook = partial(self._speculate, index)
        return self.preparer.prepare(items, scopes, hook)

    def finish(self, prepared: Prepared) -> list[ScreeningResult]:
        """The second half of :meth:`screen_bytes`: exact hashes, embed, search, classify,
        decide. ``prepared`` may come from another :class:`Preparer` for the same encoder.

        Raises:
            ValueError: ``prepared`` went through another encoder's preprocessing.
        """
        expected = self.encoder.preprocessing
        if prepared.preprocessing != expected:
            raise ValueError(f"inputs prepared for {prepared.preprocessing!r}, not {expected!r}")
        works = prepared.works
        for work in works:
            self._exact(work)
        self._embed(works)
        # The worker's watcher may apply a delta to the blocklist in place: not mid-search.
        with self.blocklist.guard:
            self._prefetch(works)
            found = [
                self._search(work) if work.decoded is not None else work.exact for work in works
            ]
            found = self._verify_local(works, found)
            for work, cands in zip(works, found, strict=True):
                if work.vectors is not None:
                    work.nearest = self._nearest(work.vectors, cands)
            self._classify(works, found)
            return [self.decide(work, cands) for work, cands in zip(works, found, strict=True)]

    def screen_unscannable(
        self, reason: str, detail: str = "", scope: Scope = EVERY_BANK
    ) -> ScreeningResult:
        """The result for an input rejected before decoding (e.g. over the byte limit), under
        ``scope``'s policy."""
        work = Work(0, error=UnscannableImage(reason, detail), scope=scope)
        return self.decide(work, [])


def _inliers(
    frame: Image.Image,
    pending: Future[local_features.Verified] | None,
    index: local_features.LocalIndex,
) -> dict[int, int]:
    """``frame``'s inliers per verified entry of ``index``: ``pending``'s when it ran against
    that index, else computed here (also when ``pending`` had not started: it is cancelled)."""
    if pending is not None and not pending.cancel():
        verified = pending.result()
        if verified.index is index:
            return verified.inliers
    return index.verify(local_features.extract_query(frame))


def _window_rows(work: Work) -> npt.NDArray[np.float32] | None:
    """A work's feature-map windows (f, w, d) as rows (f * w, d), or None."""
    return None if work.windows is None else work.windows.reshape(-1, work.windows.shape[-1])
