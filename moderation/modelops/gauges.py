"""Prometheus gauges of the canary and of drift, read at scrape time from the database.

Like the queue figures of :mod:`moderation.service.metrics`, they must be true whichever process
ran the check, so ``/metrics`` reads the latest stored :class:`~moderation.storage.models.
CanaryRun` per encoder and :class:`~moderation.storage.models.DriftRun` per signal. Names are
those the alert rules in ``monitoring/`` use (issue 18's contract).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from moderation.storage.modelops import CanaryRun, DriftRun

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


def canary_metrics(runtime: Runtime) -> list[Metric]:
    """``moderation_canary_*`` per encoder (latest run) and the policy's ``moderation_slo_*``."""
    ap = GaugeMetricFamily(
        "moderation_canary_micro_ap", "Golden-set canary µAP (latest run).", labels=["encoder"]
    )
    recall = GaugeMetricFamily(
        "moderation_canary_recall",
        "Golden-set canary recall at the policy's block / review thresholds (latest run).",
        labels=["encoder", "threshold"],
    )
    fpr = GaugeMetricFamily(
        "moderation_canary_false_positive_rate",
        "Share of golden-set negatives flagged (block or review), latest run.",
        labels=["encoder"],
    )
    last = GaugeMetricFamily(
        "moderation_canary_last_run_timestamp_seconds",
        "Unix time of the latest canary run.",
        labels=["encoder"],
    )
    for row in latest_runs(runtime):
        figures, encoder = row.figures, [row.encoder_id]
        if figures.get("micro_ap") is not None:
            ap.add_metric(encoder, figures["micro_ap"])
        for threshold in ("block", "review"):
            if figures.get(f"recall_{threshold}") is not None:
                recall.add_metric([row.encoder_id, threshold], figures[f"recall_{threshold}"])
        if figures.get("false_positive_rate") is not None:
            fpr.add_metric(encoder, figures["false_positive_rate"])
        last.add_metric(encoder, row.created_at.timestamp())
    slo = runtime.policy.slo
    return [
        ap,
        recall,
        fpr,
        last,
        GaugeMetricFamily(
            "moderation_slo_min_recall", "Policy slo.min_recall.", value=slo.min_recall
        ),
        GaugeMetricFamily(
            "moderation_slo_max_false_positive_rate",
            "Policy slo.max_false_positive_rate.",
            value=slo.max_false_positive_rate,
        ),
    ]


def _latest_per(runtime: Runtime, model: Any, group: Any) -> list[Any]:
    """The newest row (highest id) of ``model`` per value of its column ``group``, detached."""
    newest = select(group, func.max(model.id).label("id")).group_by(group).subquery()
    with runtime.sessions() as session:
        rows = session.scalars(select(model).join(newest, model.id == newest.c.id)).all()
        session.expunge_all()
    return list(rows)


def latest_runs(runtime: Runtime) -> list[CanaryRun]:
    """The latest stored canary run per encoder id, newest first."""
    rows: list[CanaryRun] = _latest_per(runtime, CanaryRun, CanaryRun.encoder_id)
    return sorted(rows, key=lambda r: r.id, reverse=True)


def latest_drift(runtime: Runtime) -> list[DriftRun]:
    """The latest stored check per drift signal, by signal name."""
    rows: list[DriftRun] = _latest_per(runtime, DriftRun, DriftRun.signal)
    return sorted(rows, key=lambda r: r.signal)


@dataclass(frozen=True)
class ModelHealth:
    """What the console's dashboard shows of the models: the latest canary run per encoder,
    the latest drift check per signal, and the policy's objectives."""

    canary: list[CanaryRun]
    drift: list[DriftRun]
    slo: dict[str, float | None]


def model_health(runtime: Runtime) -> ModelHealth:
    """The dashboard's model-health figures (see :class:`ModelHealth`)."""
    return ModelHealth(latest_runs(runtime), latest_drift(runtime), runtime.policy.slo.model_dump())


def drift_metrics(runtime: Runtime) -> list[Metric]:
    """``moderation_drift_score`` and ``moderation_drift_threshold`` per signal (latest check)."""
    score = GaugeMetricFamily(
        "moderation_drift_score",
        "Drift of the last window against the reference, per signal, in [0, 1] (0: none).",
        labels=["signal"],
    )
    threshold = GaugeMetricFamily(
        "moderation_drift_threshold",
        "Drift score above which the signal alerts.",
        labels=["signal"],
    )
    for row in latest_drift(runtime):
        score.add_metric([row.signal], row.score)
        threshold.add_metric([row.signal], row.threshold)
    return [score, threshold]


class ModelOpsCollector(Collector):
    """Canary and drift gauges for a scrape (register on the ``/metrics`` registry)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        """The gauges; none when the database is unavailable (logged)."""
        try:
            metrics = canary_metrics(self.runtime) + drift_metrics(self.runtime)
        except Exception as exc:
            logger.warning("metrics: canary/drift figures unavailable: %s", exc)
            return
        yield from metrics
