"""The review queue: uncertain screenings settled by people, one reviewer per item at a time.

Items come from :func:`moderation.matching.recording.record_result` (decision ``review``, or
``unscannable`` routed to review). The queue is ordered by policy priority (higher first) then
age (oldest first). :func:`claim_next` takes a lease on the next item so two reviewers never work
on the same one (ROOST Coop's "no two moderators on one job"): ``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL, an atomic conditional ``UPDATE`` on SQLite (whose write transactions
begin IMMEDIATE, see :func:`moderation.storage.db.transaction`). A lease that runs out returns
the item to the queue.

Reviewer wellness: a per-reviewer daily exposure counter with a limit, and images shown blurred
and greyscale until revealed (each reveal audited, :func:`record_reveal`). Settling an item is
:mod:`moderation.governance.review_decisions`; what the review pages show is
:mod:`moderation.governance.review_display`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.storage.console import ReviewerExposure
from moderation.storage.models import ReviewItem, User

logger = logging.getLogger(__name__)

QUEUES: dict[str, tuple[str, ...]] = {"main": ("open", "claimed"), "escalated": ("escalated",)}
"""Queue name -> item states it serves. The escalated queue is worked by admins."""


class ReviewError(Exception):
    """A review operation was refused (unknown item, bad decision, wrong bank kind...)."""


class NotClaimedError(ReviewError):
    """The item is not claimed by this reviewer (the lease ran out and someone took it)."""


class ExposureLimitReached(ReviewError):
    """The reviewer has been shown the daily limit of items: no more claims today."""


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite returns naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def resolve_now(now: datetime | None) -> datetime:
    """``now`` when given (tests pin the clock), else the current time in UTC."""
    return now if now is not None else datetime.now(UTC)


# --- exposure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """A reviewer's counts for one UTC day and the daily item limit."""

    day: str
    items: int
    reveals: int
    limit: int

    @property
    def remaining(self) -> int:
        """Items the reviewer may still be shown today."""
        return max(0, self.limit - self.items)


def _day(now: datetime) -> str:
    return utc(now).strftime("%Y-%m-%d")


def exposure(
    session: Session, user_id: int, *, limit: int, now: datetime | None = None
) -> Exposure:
    """Today's (UTC) exposure counts of ``user_id``."""
    day = _day(resolve_now(now))
    row = session.get(ReviewerExposure, (user_id, day))
    return Exposure(day, row.items if row else 0, row.reveals if row else 0, limit)


def _bump(
    session: Session, user_id: int, now: datetime, *, items: int = 0, reveals: int = 0
) -> None:
    day = _day(now)
    row = session.get(ReviewerExposure, (user_id, day), with_for_update=True)
    if row is None:
        row = ReviewerExposure(user_id=user_id, day=day, items=0, reveals=0)
        session.add(row)
    row.items += items
    row.reveals += reveals
    session.flush()


# --- claiming --------------------------------------------------------------------------------


def _claimable(
    states: Sequence[str], now: datetime, exclude: Iterable[int], client_id: int | None = None
) -> Any:
    condition = and_(
        ReviewItem.state.in_(states),
        or_(ReviewItem.lease_until.is_(None), ReviewItem.lease_until < now),
    )
    excluded = list(exclude)
    if excluded:
        condition = and_(condition, ReviewItem.id.not_in(excluded))
    if client_id is not None:
        condition = and_(condition, ReviewItem.client_id == client_id)
    return condition


def reviewer_client(session: Session, reviewer_id: int, client_id: int | None) -> int | None:
    """The API client whose items ``reviewer_id`` works: their own scope
    (``users.client_id``) when they have one, else ``client_id`` (None: every client's).

    Raises:
        ReviewError: a reviewer scoped to one client asked for another's items.
    """
    reviewer = session.get(User, reviewer_id)
    scope = None if reviewer is None else reviewer.client_id
    if scope is None:
        return client_id
    if client_id not in (None, scope):
        raise ReviewError("this reviewer works only one API client's items")
    return scope


def current_claim(
    session: Session, reviewer_id: int, *, queue: str = "main", now: datetime | None = None
) -> ReviewItem | None:
    """The item ``reviewer_id`` holds an unexpired lease on in ``queue``, if any."""
    return session.scalar(
        select(ReviewItem)
        .where(
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.state.in_(QUEUES[queue]),
            ReviewItem.lease_until >= resolve_now(now),
        )
        .order_by(ReviewItem.lease_until.desc())
        .limit(1)
    )


def claim_next(
    session: Session,
    *,
    reviewer_id: int,
    lease_seconds: int,
    daily_limit: int,
    queue: str = "main",
    exclude: Iterable[int] = (),
    now: datetime | None = None,
    client_id: int | None = None,
) -> ReviewItem | None:
    """Lease the next item (priority, then age) to ``reviewer_id``; None when the queue is empty.
    Only items of API client ``client_id`` (None: any), and only of the reviewer's own client
    when they are scoped to one (:func:`reviewer_client`).

    A reviewer holds one item at a time: an unexpired claim of theirs (not in ``exclude``) is
    returned again with its lease renewed. A new claim counts towards the reviewer's daily
    exposure and is audited (``review.claim``).

    Raises:
        ExposureLimitReached: the reviewer was shown ``daily_limit`` items today.
        ReviewError: unknown queue, or the escalated queue for someone who is not an admin.
    """
    if queue not in QUEUES:
        raise ReviewError(f"unknown queue {queue!r}")
    moment = resolve_now(now)
    lease_until = moment + timedelta(seconds=lease_seconds)
    excluded = set(exclude)
    held = current_claim(session, reviewer_id, queue=queue, now=moment)
    if held is not None and held.id not in excluded:
        held.lease_until = lease_until
        return held
    _check_may_claim(session, reviewer_id, queue=queue, daily_limit=daily_limit, now=moment)
    client_id = reviewer_client(session, reviewer_id, client_id)
    claimed_state = "claimed" if queue == "main" else "escalated"
    take = (
        _take_skip_locked
        if session.get_bind().dialect.name == "postgresql"
        else _take_compare_and_set
    )
    item = take(
        session,
        QUEUES[queue],
        excluded,
        now=moment,
        values={"state": claimed_state, "claimed_by": reviewer_id, "lease_until": lease_until},
        client_id=client_id,
    )
    if item is None:
        return None
    session.flush()
    _bump(session, reviewer_id, moment, items=1)
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.claim",
        target=f"review_item:{item.id}",
        details={"queue": queue, "lease_until": lease_until.isoformat()},
    )
    return item


def _check_may_claim(
    session: Session, reviewer_id: int, *, queue: str, daily_limit: int, now: datetime
) -> None:
    """Refuse a new claim by a disabled user, a non-admin on the escalated queue, or over limit."""
    reviewer = session.get(User, reviewer_id)
    if reviewer is None or reviewer.disabled:
        raise ReviewError(f"no active user {reviewer_id}")
    if queue == "escalated" and reviewer.role != "admin":
        raise ReviewError("only admins work the escalated queue")
    if exposure(session, reviewer_id, limit=daily_limit, now=now).remaining <= 0:
        raise ExposureLimitReached(f"daily limit of {daily_limit} review items reached")


def _queue_head(
    column: Any,
    states: Sequence[str],
    now: datetime,
    excluded: Iterable[int],
    client_id: int | None = None,
) -> Select[Any]:
    """Select ``column`` of the first claimable item: highest priority, then oldest."""
    return (
        select(column)
        .where(_claimable(states, now, excluded, client_id))
        .order_by(ReviewItem.priority.desc(), ReviewItem.created_at.asc(), ReviewItem.id.asc())
        .limit(1)
    )


def _take_skip_locked(
    session: Session,
    states: Sequence[str],
    excluded: set[int],
    *,
    now: datetime,
    values: dict[str, Any],
    client_id: int | None = None,
) -> ReviewItem | None:
    """PostgreSQL: lock the first claimable row (of ``client_id``'s, when given) and set
    ``values`` on it."""
    # Rows another transaction is claiming are skipped rather than waited for.
    item = session.scalars(
        _queue_head(ReviewItem, states, now, excluded, client_id).with_for_update(skip_locked=True)
    ).first()
    if item is not None:
        for name, value in values.items():
            setattr(item, name, value)
    return item


def _take_compare_and_set(
    session: Session,
    states: Sequence[str],
    excluded: set[int],
    *,
    now: datetime,
    values: dict[str, Any],
    client_id: int | None = None,
) -> ReviewItem | None:
    """SQLite: set ``values`` on the first claimable row (of ``client_id``'s, when given),
    retrying when another claim won."""
    # Compare-and-set: the UPDATE only wins while the row is still claimable.
    for _attempt in range(10):
        candidate = session.scalar(_queue_head(ReviewItem.id, states, now, excluded, client_id))
        if candidate is None:
            return None
        won = session.execute(
            update(ReviewItem)
            .where(ReviewItem.id == candidate, _claimable(states, now, ()))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            return session.get(ReviewItem, candidate, populate_existing=True)
    return None


def renew_lease(
    session: Session,
    item_id: int,
    reviewer_id: int,
    *,
    lease_seconds: int,
    now: datetime | None = None,
) -> bool:
    """Extend the lease of an item the reviewer holds; False when they no longer hold it."""
    moment = resolve_now(now)
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.id == item_id,
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.state.in_(("claimed", "escalated")),
        )
        .values(lease_until=moment + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, item_id: int, reviewer_id: int) -> bool:
    """Give a claimed item back to its queue (a skip); audited. False when not held."""
    item = session.get(ReviewItem, item_id, with_for_update=True)
    if item is None or item.claimed_by != reviewer_id or item.state not in ("claimed", "escalated"):
        return False
    if item.state == "claimed":
        item.state = "open"
    item.claimed_by, item.lease_until = None, None
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.release",
        target=f"review_item:{item.id}",
    )
    return True


def record_reveal(
    session: Session,
    item_id: int,
    reviewer_id: int,
    *,
    origin: str | None = None,
    now: datetime | None = None,
) -> None:
    """Count and audit (``review.reveal``) that a reviewer un-blurred an item's image."""
    _bump(session, reviewer_id, resolve_now(now), reveals=1)
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.reveal",
        target=f"review_item:{item_id}",
        origin=origin,
    )


@dataclass(frozen=True)
class QueueStats:
    """Queue depth by state and the age of the oldest waiting item, seconds."""

    open: int
    claimed: int
    escalated: int
    oldest_age_s: float | None

    @property
    def depth(self) -> int:
        """Items not yet settled."""
        return self.open + self.claimed + self.escalated


def queue_stats(
    session: Session, *, now: datetime | None = None, client_id: int | None = None
) -> QueueStats:
    """Depth and oldest waiting item of the review queue (of API client ``client_id``'s items
    only, when given)."""
    moment = resolve_now(now)
    waiting: ColumnElement[bool] = ReviewItem.state.in_(("open", "claimed", "escalated"))
    if client_id is not None:
        waiting = and_(waiting, ReviewItem.client_id == client_id)
    counts = dict(
        session.execute(
            select(ReviewItem.state, func.count()).where(waiting).group_by(ReviewItem.state)
        ).all()
    )
    oldest = session.scalar(select(func.min(ReviewItem.created_at)).where(waiting))
    return QueueStats(
        open=int(counts.get("open", 0)),
        claimed=int(counts.get("claimed", 0)),
        escalated=int(counts.get("escalated", 0)),
        oldest_age_s=(moment - utc(oldest)).total_seconds() if oldest is not None else None,
    )
