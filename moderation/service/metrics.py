"""Prometheus metrics of the queue, the workers and the upload hook.

Counters and histograms are observed in the process that does the work (web or worker) through
prometheus-client; with ``PROMETHEUS_MULTIPROC_DIR`` set (``moderation serve`` and ``moderation
worker`` set it to ``Settings.metrics_path``) every process on a machine writes there and
``/metrics`` aggregates them (prometheus-client "multiprocess mode"). Figures that must be true
across every machine (uploads by state, queue depth) are read at scrape time from the database
and the broker instead: see :func:`database_samples`.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.storage.models import CallbackDelivery, Screening, Upload

logger = logging.getLogger(__name__)

# Latency buckets (s): one CPU screening takes 20-200 ms; queue waits go up to minutes.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Queue-wait and end-to-end buckets (s). histogram_quantile interpolates linearly inside a
#: bucket, so its error grows with the bucket's width: neighbours 1.33-2x apart keep the p99 of
#: waits whose p99 lies between 0.5 s and 5 min within 1.35x of the true one
#: (tests/unit/test_backpressure.py), where the older 5 s -> 10 s -> 30 s steps read a 3-10 s
#: backlog as about twice the real wait (issue 19's load test: waits of 0.1-16 s). The
#: reconciler re-sends after 300 s (MODERATION_RECONCILE_AFTER); past 10 min only the order of
#: magnitude matters.
WAIT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0,
)  # fmt: skip

STAGE_SECONDS = Histogram(
    "moderation_stage_seconds",
    "Time per pipeline stage of one screened upload (decode, pdq, embed, search, classify, "
    "total), seconds.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "moderation_queue_wait_seconds",
    "From the upload's commit to the start of the attempt that decided it, seconds.",
    buckets=WAIT_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "moderation_end_to_end_seconds",
    "From the upload's commit to its recorded result, seconds.",
    buckets=WAIT_BUCKETS,
)
DECISIONS = Counter(
    "moderation_worker_decisions",
    "Results recorded by this process's workers, by decision.",
    ["decision"],
)
REDELIVERIES = Counter(
    "moderation_redeliveries",
    "Screening attempts that were not an upload's first (crash, lost ack, re-send).",
)
POISON = Counter(
    "moderation_poison_uploads",
    "Uploads ended unscannable (reason poison) after too many attempts.",
)
RECONCILER_RESENDS = Counter(
    "moderation_reconciler_resends",
    "Tasks re-sent by the reconciler, by kind (screening, callback).",
    ["kind"],
)
UPLOADS_REFUSED = Counter(
    "moderation_uploads_refused",
    "Uploads the hook refused at a queue-depth bound before storing them, by reason: "
    "queue_full (503, all clients), client_queue_full (429, the client's share).",
    ["reason"],
)
for _reason in ("queue_full", "client_queue_full"):  # exported at 0 before the first refusal
    UPLOADS_REFUSED.labels(reason=_reason)
ENQUEUE_FAILURES = Counter(
    "moderation_enqueue_failures",
    "Tasks that could not be sent after their row was committed (the reconciler re-sends).",
)
CALLBACK_ATTEMPTS = Counter(
    "moderation_callback_attempts",
    "Callback delivery attempts, by outcome (delivered, retry, failed, refused).",
    ["outcome"],
)

APPEALS = Counter(
    "moderation_appeals",
    "Appeals of decisions by platforms, by outcome (filed, upheld, overturned).",
    ["outcome"],
)


def bearer_token_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <expected>`` (scheme
    case-insensitive, the token compared in constant time: ``hmac.compare_digest``)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8"), expected.encode("utf-8")
    )


@dataclass(frozen=True)
class DatabaseSamples:
    """Counts read from the database at scrape time (true across every machine)."""

    uploads_by_status: dict[str, int]
    results_by_decision: dict[str, int]
    results_by_reason: dict[str, int]
    callbacks_by_state: dict[str, int]


def database_samples(session: Session) -> DatabaseSamples:
    """Uploads per status, results per decision and per unscannable reason, callbacks per state."""

    def counts(query: Any) -> dict[Any, int]:
        return {key: int(value) for key, value in session.execute(query).all()}

    statuses = counts(select(Upload.status, func.count()).group_by(Upload.status))
    decisions = counts(select(Screening.decision, func.count()).group_by(Screening.decision))
    reasons = counts(
        select(Screening.reason, func.count())
        .where(Screening.decision == "unscannable")
        .group_by(Screening.reason)
    )
    callbacks = counts(
        select(CallbackDelivery.state, func.count()).group_by(CallbackDelivery.state)
    )
    return DatabaseSamples(
        uploads_by_status={str(k): int(v) for k, v in statuses.items()},
        results_by_decision={str(k): int(v) for k, v in decisions.items()},
        results_by_reason={str(k or ""): int(v) for k, v in reasons.items()},
        callbacks_by_state={str(k): int(v) for k, v in callbacks.items()},
    )
