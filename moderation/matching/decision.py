"""The decision stage: a policy applied to one upload's candidates, and the result's value types.

:class:`ScreeningResult` is what screening returns for one upload (and what
:func:`moderation.matching.recording.record_result` stores); :class:`MatchResult` is one entry
the decision rests on. The functions here are the per-candidate rules that
:meth:`moderation.matching.screening.Screener.decide` combines: the level a candidate reaches
under its category's rules, the signals that agree, and the allow-bank override.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moderation.matching.candidates import Candidate
from moderation.matching.explain import (
    match_evidence,
    match_explanation,
    match_stage,
    result_decided_by,
)
from moderation.matching.policy import SEVERITY, CategoryRules, Policy
from moderation.signals.vpdq import VpdqMatch

if TYPE_CHECKING:
    from moderation.banks.records import EntryInfo  # annotations only: it imports SQLAlchemy

# The category thresholds copied into a decision's explanation (what the top match was held to,
# and the ground of its statement of reasons: moderation.matching.statements).
_EXPLAINED_THRESHOLDS = {
    "block_cosine",
    "review_cosine",
    "block_pdq_distance",
    "review_pdq_distance",
    "block_probability",
    "review_probability",
    "classifier_band",
    "block_vpdq_percent",
    "review_vpdq_percent",
    "vpdq_compared_percent",
    "action",
    "decision_ground",
}


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
    exact: str | None = None
    # A video's match: the time (s) of the frame it matched on (moderation.matching.video).
    timestamp_s: float | None = None
    # A video's match on a vPDQ entry: the query and compared match percentages.
    vpdq: VpdqMatch | None = None
    # What each signal measured and passed, and the deciding stage (match_evidence); empty
    # for a match built without it (the stage is then inferred from ``signals``).
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The match row's stored ``signals`` JSON: ``agreed`` (the agreeing signals),
        ``level``, ``frame``, the evidence (:func:`moderation.matching.explain.match_evidence`)
        and, for a video, ``timestamp_s`` (the matched frame's time, s) or ``vpdq`` (a vPDQ
        match's query and compared match percentages, 0-100: :func:`vpdq_json`)."""
        stored: dict[str, Any] = {
            "agreed": list(self.signals),
            "level": self.level,
            "frame": self.frame,
            **self.evidence,
        }
        if self.exact is not None:
            stored.setdefault("exact", self.exact)
        if self.timestamp_s is not None:
            stored["timestamp_s"] = self.timestamp_s
        if self.vpdq is not None:
            stored["vpdq"] = vpdq_json(self.vpdq)
        return stored

    def to_json(self) -> dict[str, Any]:
        """The CLI/API contract's match object: ``bank``, ``entry_id``, ``label`` and the fields
        of :func:`moderation.matching.explain.match_explanation` (values, ``level``,
        ``decided_by``, ``signals``), built from :meth:`record` exactly as the API builds them
        from the stored row."""
        return {
            "bank": self.entry.bank_name,
            "entry_id": self.entry.public_id,
            "label": self.entry.label,
            **match_explanation(
                self.record(),
                cosine=self.cosine,
                pdq_distance=self.pdq_distance,
                probability=self.probability,
            ),
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
        """The contract object of ARCHITECTURE.md (without ``path``), with ``decided_by``: the
        stage that decided (:func:`moderation.matching.explain.result_decided_by`)."""
        matches = [m.to_json() for m in self.matches]
        return {
            "decision": self.decision,
            "policy": self.policy,
            "score": None if self.score is None else round(self.score, 4),
            "reason": self.reason,
            "decided_by": result_decided_by(self.decision, self.reason, matches),
            "matches": matches,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


def vpdq_json(match: VpdqMatch) -> dict[str, float]:
    """A vPDQ match's percentages (0-100, two decimals) as results and match rows show them."""
    return {
        "query_match_percent": round(match.query_match_percent, 2),
        "compared_match_percent": round(match.compared_match_percent, 2),
    }


def vpdq_reaches(rules: CategoryRules, cand: Candidate, percent: float | None) -> bool:
    """Whether ``cand``'s vPDQ match reaches a query match ``percent`` (None: never) with the
    compared match percentage at ``rules.vpdq_compared_percent`` (``VPDQSignal.compare_hash``)."""
    return (
        cand.vpdq is not None
        and percent is not None
        and cand.vpdq.is_match(percent, rules.vpdq_compared_percent)
    )


def signal_step(rules: CategoryRules, cand: Candidate) -> int:
    """The step ``cand``'s cosine similarity, PDQ Hamming distance or vPDQ match percentages
    reach under ``rules``: 2 at the block thresholds (``rules.action``), 1 at the review
    thresholds, else 0."""
    cosine = cand.cosine if cand.cosine is not None else -1.0
    pdq = cand.pdq_distance
    if (
        cosine >= rules.block_cosine
        or (
            pdq is not None
            and rules.block_pdq_distance is not None
            and pdq <= rules.block_pdq_distance
        )
        or vpdq_reaches(rules, cand, rules.block_vpdq_percent)
    ):
        return 2
    if (
        cosine >= rules.review_cosine
        or (
            pdq is not None
            and rules.review_pdq_distance is not None
            and pdq <= rules.review_pdq_distance
        )
        or vpdq_reaches(rules, cand, rules.review_vpdq_percent)
    ):
        return 1
    return 0


def classifier_step(rules: CategoryRules, probability: float) -> int:
    """The step a calibrated copy ``probability`` (0-1) reaches: 2 at ``block_probability``,
    1 at ``review_probability`` (when set), else 0. Only for rules with ``block_probability``."""
    assert rules.block_probability is not None
    if probability >= rules.block_probability:
        return 2
    if rules.review_probability is not None and probability >= rules.review_probability:
        return 1
    return 0


def match_step(rules: CategoryRules, cand: Candidate) -> tuple[int, bool]:
    """(step, held by the band) for ``cand``: 0 nothing, 1 review, 2 ``rules.action``.

    An exact-hash match (the upload's bytes are a listed file) always reaches 2. Without a
    classifier probability (or without probability thresholds in the rules) cosine or PDQ
    decide. With one, the classifier's step is clamped to the category's
    :class:`~moderation.matching.policy.ClassifierBand` around the cosine/PDQ step, and a match
    at the block thresholds never falls below review (the safety floor, whatever the band);
    the flag says the clamp changed the classifier's step.
    """
    if cand.exact is not None:
        return 2, False
    signal = signal_step(rules, cand)
    if cand.probability is None or rules.block_probability is None:
        return signal, False
    wanted = classifier_step(rules, cand.probability)
    band = rules.classifier_band
    floor = max(signal - band.max_lower, 1 if signal == 2 else 0)
    step = min(max(wanted, floor), signal + band.max_raise, 2)
    return step, step != wanted


def step_level(rules: CategoryRules, step: int) -> str | None:
    """The level of ``step`` (0-2) under ``rules``: None, "review" or ``rules.action``."""
    return (None, "review", rules.action)[step]


def match_level(rules: CategoryRules, cand: Candidate) -> str | None:
    """The level ``cand`` reaches under its category's ``rules``: ``rules.action``, "review", or
    None (:func:`match_step`)."""
    return step_level(rules, match_step(rules, cand)[0])


def agreed_signals(policy: Policy, rules: CategoryRules, cand: Candidate) -> tuple[str, ...]:
    """The classifier's signals, then "cosine", "pdq" and "vpdq" where each alone reaches review
    level (PDQ: within the category's review distance, else the candidate search's; vPDQ: the
    review percentage, else the block one), without repeats."""
    agreed = list(cand.signals)
    if cand.exact is not None:
        agreed.append(f"exact_{cand.exact}")
    if cand.cosine is not None and cand.cosine >= rules.review_cosine:
        agreed.append("cosine")
    if cand.pdq_distance is not None and cand.pdq_distance <= (
        rules.review_pdq_distance or policy.candidates.max_pdq_distance
    ):
        agreed.append("pdq")
    if vpdq_reaches(rules, cand, rules.review_vpdq_percent or rules.block_vpdq_percent):
        agreed.append("vpdq")
    return tuple(dict.fromkeys(agreed))


def policy_matches(policy: Policy, block_candidates: Sequence[Candidate]) -> list[MatchResult]:
    """The block-bank candidates that reach a level under their category's rules (banks the
    rules do not apply to are skipped), most severe first, then by probability or cosine."""
    matches: list[MatchResult] = []
    for cand in block_candidates:
        rules = policy.rules_for(cand.entry.category)
        if not rules.applies_to(cand.entry.bank_name):
            continue
        step, held = match_step(rules, cand)
        level = step_level(rules, step)
        if level is None:
            continue
        signals = agreed_signals(policy, rules, cand)
        if held:
            # The classifier wanted another level; the category's band kept this one.
            signals = (*signals, "classifier_band")
        quarantined = cand.entry.quarantined and level == "block"
        if quarantined:
            # A quarantined (noisy) entry only ever sends to review.
            level, signals = "review", (*signals, "quarantined")
        stage = match_stage(rules, cand, held=held, quarantined=quarantined)
        matches.append(
            MatchResult(
                entry=cand.entry,
                level=level,
                cosine=cand.cosine,
                pdq_distance=cand.pdq_distance,
                probability=cand.probability,
                frame=cand.frame,
                signals=signals,
                exact=cand.exact,
                vpdq=cand.vpdq,
                evidence=match_evidence(rules, cand, stage),
            )
        )
    matches.sort(key=lambda m: (-SEVERITY[m.level], -(m.probability or m.cosine or 0.0)))
    return matches


def top_match_outcome(
    policy: Policy, top: MatchResult
) -> tuple[str, str, int | None, int | None, dict[str, Any]]:
    """(decision, category, review priority, legal hold days, explanation entries) for the
    upload whose most severe match is ``top``; priority only for review, hold only for block."""
    rules = policy.rules_for(top.entry.category)
    decision = top.level
    explained = {
        "thresholds": rules.model_dump(include=_EXPLAINED_THRESHOLDS),
        "signals": list(top.signals),
    }
    priority = rules.review_priority if decision == "review" else None
    hold_days = rules.legal_hold_days if decision == "block" else None
    return decision, top.entry.category, priority, hold_days, explained


def allow_bank_hit(policy: Policy, allow_candidates: Sequence[Candidate]) -> Candidate | None:
    """The first allow-bank candidate within ``policy.allow``'s cosine or PDQ limit, or None."""
    return next(
        (
            c
            for c in allow_candidates
            if c.exact is not None
            or (c.cosine or -1.0) >= policy.allow.min_cosine
            or (
                policy.allow.max_pdq_distance is not None
                and c.pdq_distance is not None
                and c.pdq_distance <= policy.allow.max_pdq_distance
            )
        ),
        None,
    )


def candidate_summary(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """The five best-ranked candidates as the explanation shows them (rounded to 4 places)."""
    return [
        {
            "entry_id": c.entry.public_id,
            "bank": c.entry.bank_name,
            "cosine": None if c.cosine is None else round(c.cosine, 4),
            "pdq_distance": c.pdq_distance,
            "probability": None if c.probability is None else round(c.probability, 4),
            "features": {k: round(v, 4) for k, v in c.features.items()},
            **({"exact": c.exact} if c.exact is not None else {}),
            **({"vpdq": vpdq_json(c.vpdq)} if c.vpdq is not None else {}),
        }
        for c in sorted(candidates, key=lambda c: -c.ranking_score)[:5]
    ]
