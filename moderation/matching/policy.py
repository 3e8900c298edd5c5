"""Policies: ``policies/<name>.yaml`` validated into typed objects, failing fast on bad files.

A policy says, per category of bank, which banks count, the thresholds that turn a match into
``review`` or ``block``, what an unscannable upload becomes and how urgent its review is. Files are
data (STYLE.md rule 8): :func:`load_policy` is the only reader, and a bad file raises
:class:`PolicyError` naming the file, the field and the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moderation.config import ConfigurationError

logger = logging.getLogger(__name__)

Decision = Literal["allow", "review", "block", "unscannable"]
Action = Literal["block", "review"]

# Severity order used to combine frames, matches and categories: the worst one wins.
SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "unscannable": 2, "block": 3}

PDQ_MATCH_DISTANCE = 31
"""ThreatExchange's default PDQ Hamming threshold (python-threatexchange
``signal_type/pdq/pdq_utils.py``: ``PDQ_CONFIDENT_MATCH_THRESHOLD = 31``)."""


class PolicyError(ConfigurationError):
    """A policy file is missing or invalid; the message names the file, field and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CandidateRules(_Strict):
    """Stage-1 search: which index hits are worth looking at."""

    top_k: int = Field(default=10, ge=1, le=1000)
    min_cosine: float = Field(default=0.5, ge=-1.0, le=1.0)
    max_pdq_distance: int = Field(default=PDQ_MATCH_DISTANCE, ge=0, le=256)
    min_pdq_quality: int = Field(default=50, ge=0, le=100)
    # Feature-map windows (moderation.signals.encoders.feature_windows): each window's best
    # ``window_top_k`` entries at or above ``min_window_cosine`` are candidates too.
    min_window_cosine: float = Field(default=0.55, ge=-1.0, le=1.0)
    window_top_k: int = Field(default=3, ge=1, le=1000)


class ClassifierBand(_Strict):
    """How far the classifier stage may move a match from the level its cosine and PDQ reach.

    Levels are steps: 0 nothing, 1 review (the review thresholds), 2 the category's action (the
    block thresholds). With an active model, a match ends at the classifier's step (from the
    probability thresholds) clamped to ``[signal step - max_lower, signal step + max_raise]``.
    ``max_lower`` is at most 1, so a match at or above ``block_cosine`` or within
    ``block_pdq_distance`` is never allowed whatever the probability (the safety floor): the
    classifier may at most send it to review, and not at all with ``max_lower: 0``.
    """

    max_lower: int = Field(default=1, ge=0, le=1)
    max_raise: int = Field(default=2, ge=0, le=2)


class CategoryRules(_Strict):
    """Decision rules for the banks of one category."""

    banks: list[str] = Field(default_factory=lambda: ["*"])
    action: Action = "block"
    block_cosine: float = Field(ge=-1.0, le=1.0)
    review_cosine: float = Field(ge=-1.0, le=1.0)
    block_pdq_distance: int | None = Field(default=None, ge=0, le=256)
    review_pdq_distance: int | None = Field(default=None, ge=0, le=256)
    block_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    review_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    classifier_band: ClassifierBand = Field(default_factory=ClassifierBand)
    # vPDQ (a video upload against a hash list's video signatures): the query match percentage
    # (share of the upload's usable frames within VPDQ_DISTANCE_THRESHOLD bits of the entry's)
    # at which a match triggers ``action`` / goes to review, provided the compared match
    # percentage (share of the entry's frames matched) reaches ``vpdq_compared_percent``.
    # Defaults: python-threatexchange ``VPDQSignal.compare_hash`` (80 and 0).
    block_vpdq_percent: float | None = Field(default=80.0, ge=0.0, le=100.0)
    review_vpdq_percent: float | None = Field(default=50.0, ge=0.0, le=100.0)
    vpdq_compared_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    unscannable: Literal["review", "block"] = "review"
    review_priority: int = Field(default=50, ge=0, le=100)
    zero_shot_prompts: list[str] = Field(default_factory=list)
    # Legal hold (GDPR Art. 17(3)(b)): uploads decided ``block`` in this category are kept this
    # many days even when their data subject asks for erasure; ``legal_hold_basis`` is the law
    # cited on the erasure receipt.
    legal_hold_days: int | None = Field(default=None, ge=1, le=36500)
    legal_hold_basis: str | None = Field(default=None, min_length=1, max_length=300)
    # The statement of reasons' ground for a block in this category (EU DSA Art. 17(3)(d)/(e)).
    decision_ground: Literal["illegal_content", "incompatible_with_terms"] = (
        "incompatible_with_terms"
    )

    @model_validator(mode="after")
    def _ordered(self) -> CategoryRules:
        if self.legal_hold_days is not None and not self.legal_hold_basis:
            raise ValueError("legal_hold_days needs legal_hold_basis (the law that requires it)")
        if self.review_cosine > self.block_cosine:
            raise ValueError("review_cosine must be <= block_cosine")
        if (
            self.review_pdq_distance is not None
            and self.block_pdq_distance is not None
            and self.review_pdq_distance < self.block_pdq_distance
        ):
            raise ValueError("review_pdq_distance must be >= block_pdq_distance")
        if (
            self.review_probability is not None
            and self.block_probability is not None
            and self.review_probability > self.block_probability
        ):
            raise ValueError("review_probability must be <= block_probability")
        if (
            self.review_vpdq_percent is not None
            and self.block_vpdq_percent is not None
            and self.review_vpdq_percent > self.block_vpdq_percent
        ):
            raise ValueError("review_vpdq_percent must be <= block_vpdq_percent")
        return self

    @property
    def legal_hold_citation(self) -> str | None:
        """``"<basis>: <period>"`` for erasure receipts, e.g. ``"18 U.S.C. 2258A ...: 1 year"``."""
        if self.legal_hold_days is None:
            return None
        days = self.legal_hold_days
        years, rest = divmod(days, 365)
        period = f"{years} year{'s' * (years != 1)}" if years and not rest else f"{days} days"
        return f"{self.legal_hold_basis}: {period}"

    def applies_to(self, bank_name: str) -> bool:
        """True when this category's rules cover the bank called ``bank_name``."""
        return "*" in self.banks or bank_name in self.banks


class AllowRules(_Strict):
    """Allow banks: a close enough match suppresses block-bank matches."""

    min_cosine: float = Field(default=0.9, ge=-1.0, le=1.0)
    max_pdq_distance: int | None = Field(default=None, ge=0, le=256)


class FloodControlRules(_Strict):
    """Noisy-entry quarantine: an entry of a block bank whose matches today (UTC) reach
    ``max(min_matches, bank_median_multiple x the median of today's counts of its bank's active
    entries, 0 for those not matched)`` or ``max_matches_per_day`` is quarantined (its matches
    only reach review) until an admin confirms or releases it
    (:mod:`moderation.banks.flood_control`)."""

    enabled: bool = True
    max_matches_per_day: int = Field(default=1000, ge=1)
    bank_median_multiple: float = Field(default=100.0, gt=1.0)
    min_matches: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _floor_below_cap(self) -> FloodControlRules:
        if self.min_matches > self.max_matches_per_day:
            raise ValueError("min_matches must be <= max_matches_per_day")
        return self


class SloRules(_Strict):
    """Service-level objectives the golden-set canary (:mod:`moderation.modelops.canary`) holds
    every snapshot, classifier model, policy and encoder to: a classifier model or encoder
    below them is not promoted, and a live run below them alerts."""

    # Share of the golden set's labelled copies flagged (review or block) with the right match.
    min_recall: float = Field(default=0.95, ge=0.0, le=1.0)
    # Share of those blocked outright; null: not an objective.
    min_block_recall: float | None = Field(default=None, ge=0.0, le=1.0)
    # Share of the golden set's negatives flagged (review or block).
    max_false_positive_rate: float = Field(default=0.02, ge=0.0, le=1.0)


class Policy(_Strict):
    """A validated policy file."""

    name: str
    description: str = ""
    candidates: CandidateRules = Field(default_factory=CandidateRules)
    allow: AllowRules = Field(default_factory=AllowRules)
    categories: dict[str, CategoryRules]
    default_category: str = "default"
    flood_control: FloodControlRules = Field(default_factory=FloodControlRules)
    slo: SloRules = Field(default_factory=SloRules)

    @model_validator(mode="after")
    def _has_default(self) -> Policy:
        if self.default_category not in self.categories:
            raise ValueError(
                f"default_category {self.default_category!r} is not among categories "
                f"{sorted(self.categories)}"
            )
        for name, rules in self.categories.items():
            if rules.review_cosine < self.candidates.min_cosine:
                raise ValueError(
                    f"categories.{name}.review_cosine {rules.review_cosine} is below "
                    f"candidates.min_cosine {self.candidates.min_cosine}: such matches are never "
                    "retrieved"
                )
        return self

    def rules_for(self, category: str) -> CategoryRules:
        """Rules for a bank category, falling back to the default category."""
        return self.categories.get(category) or self.categories[self.default_category]

    @property
    def unscannable_decision(self) -> Literal["review", "block"]:
        """What an undecodable upload becomes: the strictest category's choice."""
        if any(rules.unscannable == "block" for rules in self.categories.values()):
            return "block"
        return "review"

    @property
    def unscannable_priority(self) -> int:
        """Review priority of an unscannable upload: the highest of any category."""
        return max(rules.review_priority for rules in self.categories.values())


def _format_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_policy(document: Any, *, source: str) -> Policy:
    """Validate an already-parsed YAML document into a :class:`Policy`.

    Raises:
        PolicyError: naming ``source``, the field path and the reason.
    """
    if not isinstance(document, dict):
        raise PolicyError(f"{source}: a policy must be a mapping, got {type(document).__name__}")
    try:
        return Policy.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise PolicyError(
            f"{source}: field {_format_loc(first['loc'])}: {first['msg']}{more}"
        ) from exc


def load_policy(policies_dir: Path, name: str) -> Policy:
    """Load and validate ``<policies_dir>/<name>.yaml``.

    Raises:
        PolicyError: the file is missing, is not YAML, or does not validate.
    """
    path = policies_dir / f"{name}.yaml"
    if not path.is_file():
        available = (
            sorted(p.stem for p in policies_dir.glob("*.yaml")) if policies_dir.is_dir() else []
        )
        raise PolicyError(f"{path}: no such policy file (available: {available})")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    policy = parse_policy(document, source=str(path))
    if policy.name != name:
        raise PolicyError(f"{path}: field name: {policy.name!r} must equal the file name {name!r}")
    logger.debug("loaded policy %s from %s", name, path)
    return policy
