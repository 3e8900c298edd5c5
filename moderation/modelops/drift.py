"""Drift monitoring: the last window of screenings against a reference window, one score per
signal in [0, 1] (0: no drift).

Neither ``evidently`` nor ``alibi-detect`` is installed in this deployment's environment, so the
tests are scipy.stats's (both libraries compute these same tests for these data types):

* ``nearest_cosine``: the cosine of each upload's nearest bank entry, however far, as
  recorded in its result's explanation (``Screener._nearest``); score = the two-sample
  Kolmogorov-Smirnov statistic (``scipy.stats.ks_2samp``), the largest gap between the two
  empirical distributions. A preprocessing bug (colour inversion, blur) or an upstream format
  change moves every upload's nearest cosine.
* ``score``: the decision score (classifier probability, else cosine; 0 without a block
  candidate); KS statistic as above.
* ``decision_rates``: how often each outcome occurs, by decision, category and bank
  (``block/default/bank-a``, ``allow``, ``unscannable``...); score = Cramér's V of the
  2 x k contingency table (``scipy.stats.chi2_contingency``), in [0, 1]. A flood of one image
  shifts it.

A window with fewer than :data:`MIN_SAMPLES` results scores 0 (``details.insufficient``): no
alert on a quiet hour. Each check is stored (:class:`~moderation.storage.models.DriftRun`),
audited (``drift.check``) and exported (``moderation_drift_score{signal}``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats
from sqlalchemy import select

from moderation.audit.log import record_event
from moderation.storage.db import transaction
from moderation.storage.modelops import DriftRun
from moderation.storage.models import Screening

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

MIN_SAMPLES = 30
"""Results each window needs before a score means anything (below it the score is 0)."""
REFERENCE_S = 7 * 24 * 3600
"""The reference window: the 7 days before the checked window (a week spans weekday cycles)."""
MAX_ROWS = 20000
"""Newest results read per window (bounds the check's cost on a busy deployment)."""
THRESHOLDS: dict[str, float] = {
    # KS statistic 0.25: a quarter of the mass moved; at 30 samples each the KS test's 1%
    # critical value is 0.42, at 200 each 0.16, so 0.25 is significant from ~80 uploads an hour
    # and far above the sampling noise of a busy hour.
    "nearest_cosine": 0.25,
    "score": 0.25,
    # Cramér's V 0.2: "moderate" association (Cohen 1988, w = 0.3 for a 2 x k table is medium);
    # a stable mix of decisions stays well under 0.1.
    "decision_rates": 0.2,
}


@dataclass(frozen=True)
class SignalDrift:
    """One signal's check: ``score`` in [0, 1] and its alert ``threshold``."""

    signal: str
    score: float
    threshold: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        """True when the score is over the threshold."""
        return self.score > self.threshold


@dataclass(frozen=True)
class DriftReport:
    """Every signal's check over ``window`` against ``reference`` (ISO times, UTC)."""

    window: tuple[str, str]
    reference: tuple[str, str]
    signals: tuple[SignalDrift, ...]

    @property
    def drifted(self) -> bool:
        """True when any signal drifted."""
        return any(s.drifted for s in self.signals)

    def to_json(self) -> dict[str, Any]:
        """JSON for the CLI."""
        return {
            "window": list(self.window),
            "reference": list(self.reference),
            "drifted": self.drifted,
            "signals": {
                s.signal: {
                    "score": round(s.score, 4),
                    "threshold": s.threshold,
                    "drifted": s.drifted,
                    **s.details,
                }
                for s in self.signals
            },
        }


@dataclass
class _Window:
    cosines: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)


def nearest_cosine(explanation: dict[str, Any]) -> float:
    """The cosine of the nearest bank entry recorded in a result's explanation, else the
    highest among its candidates (results screened before it was recorded), else 0.0."""
    if explanation.get("nearest_cosine") is not None:
        return float(explanation["nearest_cosine"])
    cosines = [
        c["cosine"] for c in explanation.get("candidates", []) if c.get("cosine") is not None
    ]
    return float(max(cosines, default=0.0))


def outcome_key(row: Screening) -> str:
    """``decision/category/bank`` of a flagged result (its top candidate's bank), else the
    decision alone."""
    if row.decision not in ("block", "review"):
        return row.decision
    candidates = (row.explanation or {}).get("candidates") or [{}]
    return f"{row.decision}/{row.category}/{candidates[0].get('bank')}"


def _window(runtime: Runtime, start: datetime, end: datetime) -> _Window:
    with runtime.sessions() as session:
        rows = session.scalars(
            select(Screening)
            .where(Screening.created_at >= start, Screening.created_at < end)
            .order_by(Screening.created_at.desc())
            .limit(MAX_ROWS)
        ).all()
        out = _Window()
        for row in rows:
            out.outcomes.append(outcome_key(row))
            if row.decision != "unscannable":
                out.cosines.append(nearest_cosine(row.explanation or {}))
                out.scores.append(float(row.score or 0.0))
    return out


def _insufficient(signal: str, n_current: int, n_reference: int) -> SignalDrift | None:
    if min(n_current, n_reference) >= MIN_SAMPLES:
        return None
    details = {"insufficient": True, "current": n_current, "reference": n_reference}
    return SignalDrift(signal, 0.0, THRESHOLDS[signal], details)


def ks_drift(signal: str, current: Sequence[float], reference: Sequence[float]) -> SignalDrift:
    """Two-sample KS statistic of ``current`` against ``reference`` (with the p-value and both
    means in ``details``)."""
    short = _insufficient(signal, len(current), len(reference))
    if short is not None:
        return short
    result = stats.ks_2samp(np.asarray(current), np.asarray(reference))
    details = {
        "p_value": float(result.pvalue),
        "current": len(current),
        "reference": len(reference),
        "current_mean": round(float(np.mean(current)), 4),
        "reference_mean": round(float(np.mean(reference)), 4),
    }
    return SignalDrift(signal, float(result.statistic), THRESHOLDS[signal], details)


def categorical_drift(signal: str, current: Sequence[str], reference: Sequence[str]) -> SignalDrift:
    """Cramér's V of the chi-square test of the two windows' category counts (with the p-value
    and the shares that moved most in ``details``)."""
    short = _insufficient(signal, len(current), len(reference))
    if short is not None:
        return short
    keys = sorted(set(current) | set(reference))
    table = np.array([[current.count(k) for k in keys], [reference.count(k) for k in keys]])
    details: dict[str, Any] = {"current": len(current), "reference": len(reference)}
    if len(keys) < 2:
        return SignalDrift(signal, 0.0, THRESHOLDS[signal], details)
    chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    score = math.sqrt(float(chi2) / int(table.sum()))
    shares = {
        k: (table[0, i] / len(current), table[1, i] / len(reference)) for i, k in enumerate(keys)
    }
    moved = sorted(shares.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))[:5]
    details["p_value"] = float(p_value)
    details["moved"] = {
        k: {"current": round(float(c), 4), "reference": round(float(r), 4)} for k, (c, r) in moved
    }
    return SignalDrift(signal, min(1.0, score), THRESHOLDS[signal], details)


def run_drift(
    runtime: Runtime, *, actor: str, window_s: int = 3600, now: datetime | None = None
) -> DriftReport:
    """Check every signal over the last ``window_s`` seconds against the :data:`REFERENCE_S`
    before it, store and audit the scores (``drift.check``).

    Returns:
        the report (``drifted`` when any score is over its threshold).
    """
    end = now or datetime.now(UTC)
    start = end - timedelta(seconds=window_s)
    ref_start = start - timedelta(seconds=REFERENCE_S)
    current, reference = _window(runtime, start, end), _window(runtime, ref_start, start)
    signals = (
        ks_drift("nearest_cosine", current.cosines, reference.cosines),
        ks_drift("score", current.scores, reference.scores),
        categorical_drift("decision_rates", current.outcomes, reference.outcomes),
    )
    report = DriftReport(
        (start.isoformat(timespec="seconds"), end.isoformat(timespec="seconds")),
        (ref_start.isoformat(timespec="seconds"), start.isoformat(timespec="seconds")),
        signals,
    )
    with transaction(runtime.sessions) as session:
        for s in signals:
            session.add(
                DriftRun(signal=s.signal, score=s.score, threshold=s.threshold, details=s.details)
            )
        record_event(
            session,
            actor=actor,
            action="drift.check",
            outcome="failure" if report.drifted else "success",
            details={s.signal: round(s.score, 4) for s in signals},
        )
    for s in signals:
        if s.drifted:
            logger.error("drift on %s: %.3f > %.3f (%s)", s.signal, s.score, s.threshold, s.details)
    return report
