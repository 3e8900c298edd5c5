"""Operational figures for the console's dashboard, computed from the database.

Screenings per hour by decision, screening latency percentiles (from ``screenings.timings``),
review queue depth and oldest item, review throughput, index version and staleness, erasure
requests nearing the GDPR deadline, quarantined (noisy) entries awaiting an admin, and appeals
(open, upheld, overturned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session

from moderation.banks.flood_control import count_quarantined
from moderation.banks.versions import current_snapshot
from moderation.governance.appeal_display import appeal_counts
from moderation.governance.review import QueueStats, queue_stats, utc
from moderation.storage.models import ErasureRequest, IndexSnapshot, ReviewItem, Screening

logger = logging.getLogger(__name__)

ERASURE_WARNING_DAYS = 25
"""GDPR Art. 12(3) gives one month to act on an erasure request; flag requests open this long."""
STALE_GRACE_S = 120.0
"""Screenings this long after a new snapshot still on an older version mean stale workers."""
LATENCY_SAMPLE = 20_000
"""Most recent screenings whose timings feed the latency percentiles."""
SCREENING_DECISIONS: tuple[str, ...] = ("allow", "review", "block", "unscannable")
REVIEW_DECISIONS: tuple[str, ...] = ("confirm", "not_a_match", "escalate")


@dataclass(frozen=True)
class HourBucket:
    """Counts by label for one hour starting at ``start`` (UTC)."""

    start: datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """Sum over labels."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class OverdueErasure:
    """An erasure request open for at least :data:`ERASURE_WARNING_DAYS`."""

    request_id: str
    received_at: datetime
    age_days: float
    state: str


@dataclass(frozen=True)
class DashboardStats:
    """Everything the dashboard shows, for the ``hours`` before ``now``."""

    now: datetime
    hours: int
    screenings: list[HourBucket]
    reviews: list[HourBucket]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_samples: int
    queue: QueueStats
    index_version: int | None
    index_entries: int | None
    index_age_s: float | None
    latest_screening_version: int | None
    index_stale: bool
    overdue_erasures: list[OverdueErasure]
    quarantined_entries: int = 0
    appeals: dict[str, int] = field(default_factory=dict)


def _hour_number(session: Session, column: Any) -> Any:
    # Whole hours since the Unix epoch, computed by the database so only counts travel.
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column) / 3600), Integer)
    return cast(func.strftime("%s", column), Integer) / 3600


def _buckets(
    session: Session,
    column: Any,
    label: Any,
    labels: tuple[str, ...],
    since: datetime,
    hours: int,
    *where: Any,
) -> list[HourBucket]:
    hour = _hour_number(session, column)
    rows = session.execute(
        select(hour, label, func.count()).where(column >= since, *where).group_by(hour, label)
    ).all()
    first = int(since.timestamp()) // 3600
    counts = [dict.fromkeys(labels, 0) for _ in range(hours)]
    for number, name, count in rows:
        index = int(number) - first
        if 0 <= index < hours and name is not None:
            counts[index][str(name)] = counts[index].get(str(name), 0) + int(count)
    return [
        HourBucket(datetime.fromtimestamp((first + i) * 3600, UTC), counts[i]) for i in range(hours)
    ]


def _latency(session: Session, since: datetime) -> tuple[float | None, float | None, int]:
    timings = session.scalars(
        select(Screening.timings)
        .where(Screening.created_at >= since)
        .order_by(Screening.id.desc())
        .limit(LATENCY_SAMPLE)
    ).all()
    totals = [
        float(t["total"])
        for t in timings
        if isinstance(t, dict) and isinstance(t.get("total"), int | float)
    ]
    if not totals:
        return None, None, 0
    p50, p99 = np.percentile(np.asarray(totals, dtype=np.float64), [50, 99])
    return float(p50), float(p99), len(totals)


def _latest_screening_version(
    session: Session, snapshot: IndexSnapshot | None
) -> tuple[int | None, bool]:
    """The index version of the newest screening, and whether it lags the current snapshot.

    Stale: that screening used an older index version although it ran more than
    :data:`STALE_GRACE_S` after the current snapshot was written (workers did not reload it).
    """
    latest = session.execute(
        select(Screening.index_version, Screening.created_at).order_by(Screening.id.desc()).limit(1)
    ).first()
    stale = False
    if snapshot is not None and latest is not None and latest[0] is not None:
        after = (utc(latest[1]) - utc(snapshot.created_at)).total_seconds()
        stale = latest[0] < snapshot.version and after > STALE_GRACE_S
    return (latest[0] if latest else None), stale


def _overdue_erasures(session: Session, moment: datetime) -> list[OverdueErasure]:
    """Open erasure requests received :data:`ERASURE_WARNING_DAYS` or more before ``moment``."""
    deadline = moment - timedelta(days=ERASURE_WARNING_DAYS)
    return [
        OverdueErasure(
            request_id=r.id,
            received_at=utc(r.received_at),
            age_days=(moment - utc(r.received_at)).total_seconds() / 86400,
            state=r.state,
        )
        for r in session.scalars(
            select(ErasureRequest)
            .where(ErasureRequest.completed_at.is_(None), ErasureRequest.received_at <= deadline)
            .order_by(ErasureRequest.received_at)
        )
    ]


def dashboard_stats(
    session: Session, *, hours: int = 24, now: datetime | None = None
) -> DashboardStats:
    """Compute the dashboard's figures for the last ``hours`` whole hours (including this one).

    Latency percentiles are over the ``total`` of ``screenings.timings`` (ms) of at most
    :data:`LATENCY_SAMPLE` recent screenings (numpy's linear interpolation).
    """
    moment = now or datetime.now(UTC)
    current_hour = int(moment.timestamp()) // 3600
    since = datetime.fromtimestamp((current_hour - hours + 1) * 3600, UTC)
    screenings = _buckets(
        session, Screening.created_at, Screening.decision, SCREENING_DECISIONS, since, hours
    )
    reviews = _buckets(
        session,
        ReviewItem.decided_at,
        ReviewItem.decision,
        REVIEW_DECISIONS,
        since,
        hours,
        ReviewItem.decided_at.is_not(None),
    )
    p50, p99, samples = _latency(session, since)
    snapshot = current_snapshot(session)
    latest_version, stale = _latest_screening_version(session, snapshot)
    return DashboardStats(
        now=moment,
        hours=hours,
        screenings=screenings,
        reviews=reviews,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_samples=samples,
        queue=queue_stats(session, now=moment),
        index_version=snapshot.version if snapshot else None,
        index_entries=snapshot.entry_count if snapshot else None,
        index_age_s=(moment - utc(snapshot.created_at)).total_seconds() if snapshot else None,
        latest_screening_version=latest_version,
        index_stale=stale,
        overdue_erasures=_overdue_erasures(session, moment),
        quarantined_entries=count_quarantined(session),
        appeals=appeal_counts(session, since),
    )
