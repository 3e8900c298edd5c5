"""The screening pipeline: decode -> embed + PDQ -> search -> classify -> decide -> record.

:class:`Screener` holds the injected collaborators (encoder, decrypted blocklist, policy,
decode limits, optional classifier stage) and screens a batch of uploads in one pass so the
encoder runs at full batch size. :func:`record_result` writes a result to the database. The CLI,
the Celery task and the tests all call these two (STYLE.md rule 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.blocklist import Blocklist
from moderation.banks.records import EntryInfo
from moderation.matching.policy import SEVERITY, CandidateRules, CategoryRules, Policy
from moderation.media.decode import DecodedImage, DecodeLimits, UnscannableImage, decode_image
from moderation.signals.encoders import Encoder
from moderation.signals.pdq import PdqHash, pdq_hash_dihedral
from moderation.storage.models import Match, ReviewItem, Screening, Upload

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One entry retrieved for a query (merged over frames and signals)."""

    entry: EntryInfo
    cosine: float | None = None
    frame: int = 0
    pdq_distance: int | None = None
    probability: float | None = None
    features: dict[str, float] = field(default_factory=dict)
    signals: list[str] = field(default_factory=list)

    @property
    def ranking_score(self) -> float:
        """Probability when the classifier stage ran, else cosine (PDQ-only: a proxy)."""
        if self.probability is not None:
            return self.probability
        if self.cosine is not None:
            return self.cosine
        assert self.pdq_distance is not None
        return 1.0 - self.pdq_distance / 256.0


@dataclass(frozen=True)
class QueryContext:
    """What the classifier stage may look at for one upload."""

    frames: tuple[Image.Image, ...]
    vectors: npt.NDArray[np.float32]  # (f, d) float32, unit rows: one per frame
    pdq: tuple[tuple[PdqHash, ...], ...]  # per frame, the 8 dihedral variants


class CandidateRefiner(Protocol):
    """The classifier stage: turns candidates into calibrated copy probabilities."""

    version: str

    def refine_batch(
        self, items: Sequence[tuple[QueryContext, list[Candidate]]], blocklist: Blocklist
    ) -> None:
        """Set ``probability`` (and ``features``/``signals``) on every candidate in place.

        Gets a whole screening batch at once, so extra embeddings (query regions) run batched.
        """


@dataclass(frozen=True)
class MatchResult:
    """An entry the decision rests on."""

    entry: EntryInfo
    level: str  # block | review
    cosine: float | None
    pdq_distance: int | None
    probability: float | None
    frame: int
    signals: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The CLI/API contract's match object."""
        return {
            "bank": self.entry.bank_name,
            "entry_id": self.entry.public_id,
            "label": self.entry.label,
            "cosine": None if self.cosine is None else round(self.cosine, 4),
            "pdq_distance": self.pdq_distance,
            "probability": None if self.probability is None else round(self.probability, 4),
        }


@dataclass(frozen=True)
class ScreeningResult:
    """The outcome for one upload, with its explanation and per-stage timings (ms)."""

    decision: str
    policy: str
    score: float | None
    reason: str | None
    category: str | None
    matches: tuple[MatchResult, ...]
    timings_ms: dict[str, float]
    encoder_id: str
    index_version: int
    classifier_version: str | None
    review_priority: int | None
    explanation: dict[str, Any]
    # Days a ``block`` decision must be preserved (the category's legal hold), else None.
    legal_hold_days: int | None = None

    @property
    def needs_review(self) -> bool:
        """True when a human must look: decision review, or unscannable routed to review."""
        return self.decision == "review" or (
            self.decision == "unscannable"
            and self.explanation.get("unscannable_action") == "review"
        )

    def to_json(self) -> dict[str, Any]:
        """The contract object of ARCHITECTURE.md (without ``path``)."""
        return {
            "decision": self.decision,
            "policy": self.policy,
            "score": None if self.score is None else round(self.score, 4),
            "reason": self.reason,
            "matches": [m.to_json() for m in self.matches],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


@dataclass
class _Work:
    index: int
    decoded: DecodedImage | None = None
    error: UnscannableImage | None = None
    timings: dict[str, float] = field(default_factory=dict)
    vectors: npt.NDArray[np.float32] | None = None
    pdq: tuple[tuple[PdqHash, ...], ...] = ()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def find_candidates(
    blocklist: Blocklist,
    rules: CandidateRules,
    vectors: npt.NDArray[np.float32],
    pdq: Sequence[Sequence[PdqHash]],
) -> list[Candidate]:
    """Stage 1: the top-k entries per frame above ``rules.min_cosine`` plus the PDQ matches
    within ``rules.max_pdq_distance`` (over each frame's dihedral variants, both digests of
    quality >= ``rules.min_pdq_quality``), merged per entry, best cosine first.

    ``vectors`` is float32 (f, d), one unit row per frame; ``pdq`` the 8 variants per frame.
    Entries found only by PDQ get their cosine too, so every candidate has both signals.
    """
    found: dict[int, Candidate] = {}
    entries = blocklist.entries
    hits_per_frame = blocklist.cosine.search(vectors, rules.top_k, rules.min_cosine)
    for frame, hits in enumerate(hits_per_frame):
        for hit in hits:
            info = entries.get(hit.id)
            if info is None:
                continue
            cand = found.setdefault(hit.id, Candidate(entry=info))
            if cand.cosine is None or hit.score > cand.cosine:
                cand.cosine, cand.frame = float(hit.score), frame
    for frame, variants in enumerate(pdq):
        usable = [v for v in variants if v.quality >= rules.min_pdq_quality]
        if not usable:
            continue
        queries = np.stack([np.frombuffer(v.digest, np.uint8) for v in usable])
        for hits in blocklist.pdq.search(queries, rules.top_k, rules.max_pdq_distance):
            for hit in hits:
                info = entries.get(hit.id)
                if info is None:
                    continue
                _, quality = blocklist.pdq_of(hit.id)
                if quality < rules.min_pdq_quality:
                    continue
                cand = found.setdefault(hit.id, Candidate(entry=info, frame=frame))
                distance = int(hit.score)
                if cand.pdq_distance is None or distance < cand.pdq_distance:
                    cand.pdq_distance = distance
    for cand in found.values():
        if cand.cosine is None:
            sims = vectors @ blocklist.vector_of(cand.entry.entry_id)
            cand.frame = int(np.argmax(sims))
            cand.cosine = float(sims[cand.frame])
    return sorted(found.values(), key=lambda c: -(c.cosine or -1.0))


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
        draft_size: tuple[int, int] | None = (512, 224),
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

    # --- pipeline stages ------------------------------------------------------------------

    def _decode(self, work: _Work, data: bytes) -> None:
        start = time.perf_counter()
        try:
            work.decoded = decode_image(
                data, self.limits, draft_size=self.draft_size, draft_by_orientation=True
            )
        except UnscannableImage as exc:
            work.error = exc
        work.timings["decode"] = _ms(start)

    def _hash(self, work: _Work) -> None:
        assert work.decoded is not None
        start = time.perf_counter()
        work.pdq = tuple(pdq_hash_dihedral(frame) for frame in work.decoded.frames)
        work.timings["pdq"] = _ms(start)

    def _embed(self, works: Sequence[_Work]) -> None:
        frames = [f for w in works if w.decoded for f in w.decoded.frames]
        if not frames:
            return
        start = time.perf_counter()
        vectors = self.encoder.encode(frames, batch_size=self.batch_size)
        per_frame = _ms(start) / len(frames)
        offset = 0
        for work in works:
            if work.decoded is None:
                continue
            count = len(work.decoded.frames)
            work.vectors = vectors[offset : offset + count]
            work.timings["embed"] = per_frame * count
            offset += count

    def _search(self, work: _Work) -> list[Candidate]:
        assert work.vectors is not None
        start = time.perf_counter()
        found = find_candidates(self.blocklist, self.policy.candidates, work.vectors, work.pdq)
        work.timings["search"] = _ms(start)
        return found

    def _classify(self, works: Sequence[_Work], found: Sequence[list[Candidate]]) -> None:
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
            items.append((QueryContext(work.decoded.frames, work.vectors, work.pdq), cands))
        self.refiner.refine_batch(items, self.blocklist)
        share = _ms(start) / len(pending)
        for work, _ in pending:
            work.timings["classify"] = share

    # --- decision -------------------------------------------------------------------------

    def _level(self, rules: CategoryRules, cand: Candidate) -> str | None:
        if cand.probability is not None and rules.block_probability is not None:
            if cand.probability >= rules.block_probability:
                return rules.action
            if (
                rules.review_probability is not None
                and cand.probability >= rules.review_probability
            ):
                return "review"
            return None
        cosine = cand.cosine if cand.cosine is not None else -1.0
        pdq = cand.pdq_distance
        if cosine >= rules.block_cosine or (
            pdq is not None
            and rules.block_pdq_distance is not None
            and pdq <= rules.block_pdq_distance
        ):
            return rules.action
        if cosine >= rules.review_cosine or (
            pdq is not None
            and rules.review_pdq_distance is not None
            and pdq <= rules.review_pdq_distance
        ):
            return "review"
        return None

    def _signals(self, rules: CategoryRules, cand: Candidate) -> tuple[str, ...]:
        agreed = list(cand.signals)
        if cand.cosine is not None and cand.cosine >= rules.review_cosine:
            agreed.append("cosine")
        if cand.pdq_distance is not None and cand.pdq_distance <= (
            rules.review_pdq_distance or self.policy.candidates.max_pdq_distance
        ):
            agreed.append("pdq")
        return tuple(dict.fromkeys(agreed))

    def decide(self, work: _Work, candidates: list[Candidate]) -> ScreeningResult:
        """Apply the policy to one upload's candidates."""
        policy = self.policy
        base: dict[str, Any] = {
            "policy": policy.name,
            "encoder_id": self.blocklist.encoder_id,
            "index_version": self.blocklist.version,
            "classifier_version": self.refiner.version if self.refiner else None,
        }
        if work.error is not None:
            action = policy.unscannable_decision
            return ScreeningResult(
                decision="unscannable",
                score=None,
                reason=work.error.reason,
                category=None,
                matches=(),
                timings_ms=self._total(work.timings),
                review_priority=policy.unscannable_priority if action == "review" else None,
                explanation={"unscannable_action": action, "detail": work.error.detail},
                **base,
            )
        start = time.perf_counter()
        assert work.decoded is not None
        block_cands = [c for c in candidates if c.entry.bank_kind == "block"]
        allow_cands = [c for c in candidates if c.entry.bank_kind == "allow"]
        matches: list[MatchResult] = []
        for cand in block_cands:
            rules = policy.rules_for(cand.entry.category)
            if not rules.applies_to(cand.entry.bank_name):
                continue
            level = self._level(rules, cand)
            if level is None:
                continue
            matches.append(
                MatchResult(
                    entry=cand.entry,
                    level=level,
                    cosine=cand.cosine,
                    pdq_distance=cand.pdq_distance,
                    probability=cand.probability,
                    frame=cand.frame,
                    signals=self._signals(rules, cand),
                )
            )
        matches.sort(key=lambda m: (-SEVERITY[m.level], -(m.probability or m.cosine or 0.0)))
        best_block = max((c.ranking_score for c in block_cands), default=None)
        explanation: dict[str, Any] = {
            "frames": len(work.decoded.frames),
            "frame_indices": list(work.decoded.frame_indices),
            "candidates": [
                {
                    "entry_id": c.entry.public_id,
                    "bank": c.entry.bank_name,
                    "cosine": None if c.cosine is None else round(c.cosine, 4),
                    "pdq_distance": c.pdq_distance,
                    "probability": None if c.probability is None else round(c.probability, 4),
                    "features": {k: round(v, 4) for k, v in c.features.items()},
                }
                for c in sorted(candidates, key=lambda c: -c.ranking_score)[:5]
            ],
        }
        allow_hit = next(
            (
                c
                for c in allow_cands
                if (c.cosine or -1.0) >= policy.allow.min_cosine
                or (
                    policy.allow.max_pdq_distance is not None
                    and c.pdq_distance is not None
                    and c.pdq_distance <= policy.allow.max_pdq_distance
                )
            ),
            None,
        )
        decision, reason, category, priority = "allow", None, None, None
        hold_days: int | None = None
        if matches:
            top = matches[0]
            rules = policy.rules_for(top.entry.category)
            decision, category = top.level, top.entry.category
            explanation["thresholds"] = rules.model_dump(
                include={
                    "block_cosine",
                    "review_cosine",
                    "block_pdq_distance",
                    "review_pdq_distance",
                    "block_probability",
                    "review_probability",
                    "action",
                }
            )
            explanation["signals"] = list(top.signals)
            priority = rules.review_priority if decision == "review" else None
            hold_days = rules.legal_hold_days if decision == "block" else None
        if allow_hit is not None and (best_block is None or allow_hit.ranking_score >= best_block):
            if matches:
                explanation["suppressed_by_allow_bank"] = {
                    "entry_id": allow_hit.entry.public_id,
                    "bank": allow_hit.entry.bank_name,
                    "cosine": allow_hit.cosine,
                }
            decision, reason, category, priority, matches = "allow", "allow_bank", None, None, []
            hold_days = None
        work.timings["decide"] = _ms(start)
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

    @staticmethod
    def _total(timings: dict[str, float]) -> dict[str, float]:
        ordered = {k: timings.get(k, 0.0) for k in ("decode", "pdq", "embed", "search", "classify")}
        ordered["total"] = sum(timings.values())
        return ordered

    # --- entry points ---------------------------------------------------------------------

    def screen_bytes(self, items: Sequence[bytes]) -> list[ScreeningResult]:
        """Screen a batch of encoded images (one result per item, same order).

        Never raises for bad images: they end ``unscannable`` with a reason.
        """
        works = [_Work(i) for i in range(len(items))]
        for work, data in zip(works, items, strict=True):
            self._decode(work, data)
            if work.decoded is not None:
                self._hash(work)
        self._embed(works)
        found = [self._search(work) if work.decoded is not None else [] for work in works]
        self._classify(works, found)
        return [self.decide(work, cands) for work, cands in zip(works, found, strict=True)]

    def screen_unscannable(self, reason: str, detail: str = "") -> ScreeningResult:
        """The result for an input rejected before decoding (e.g. over the byte limit)."""
        work = _Work(0, error=UnscannableImage(reason, detail))
        return self.decide(work, [])


def record_result(
    session: Session, upload: Upload, result: ScreeningResult, *, actor: str = "screening"
) -> Screening:
    """Write a result: screening row, match rows, review item if needed, audit event.

    Idempotent by upload: an upload that already has a screening keeps it (returned as is).
    """
    existing = session.query(Screening).filter_by(upload_id=upload.id).one_or_none()
    if existing is not None:
        return existing
    screening = Screening(
        upload_id=upload.id,
        decision=result.decision,
        policy=result.policy,
        category=result.category,
        score=result.score,
        reason=result.reason,
        encoder_id=result.encoder_id,
        index_version=result.index_version,
        classifier_version=result.classifier_version,
        timings=result.timings_ms,
        explanation=result.explanation,
    )
    for match in result.matches:
        screening.matches.append(
            Match(
                entry_id=match.entry.entry_id,
                bank_id=match.entry.bank_id,
                cosine=match.cosine,
                pdq_distance=match.pdq_distance,
                probability=match.probability,
                signals={"agreed": list(match.signals), "level": match.level, "frame": match.frame},
            )
        )
    session.add(screening)
    upload.status = "done"
    if result.decision == "block" and result.legal_hold_days:
        upload.legal_hold_until = datetime.now(UTC) + timedelta(days=result.legal_hold_days)
    if result.needs_review:
        session.add(
            ReviewItem(
                upload_id=upload.id,
                category=result.category,
                priority=result.review_priority or 50,
            )
        )
    session.flush()
    record_event(
        session,
        actor=actor,
        action="screening.decide",
        target=f"upload:{upload.id}",
        details={
            "decision": result.decision,
            "reason": result.reason,
            "score": result.score,
            "subject_ref": upload.subject_ref,
            "matches": [m.entry.public_id for m in result.matches],
            "index_version": result.index_version,
            "legal_hold_until": (
                upload.legal_hold_until.isoformat() if upload.legal_hold_until else None
            ),
        },
    )
    return screening
