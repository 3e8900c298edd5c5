"""Legal holds as records: placed by every block, by hand, and released when they end.

Every hold is a :class:`~moderation.storage.models.LegalHold` row; ``Upload.legal_hold_until``
is the latest ``until`` of an upload's holds not yet released (what erasure checks,
:func:`moderation.governance.holds.is_held`). Holds come from three places, all through
:func:`moderation.matching.recording.add_hold`:

- ``automatic``: a block decision in a policy category with ``legal_hold_days``
  (:func:`moderation.matching.recording.record_result`);
- ``review``: a reviewer's confirm (:func:`hold_confirmed`), the same hold
  (:func:`moderation.matching.recording.place_block_hold`) for the same days;
- ``manual``: an admin or the DPO, with a reason and a number of days (:func:`place_manual_hold`,
  audited ``hold.place``); only these may be released by hand (:func:`release_hold`, audited
  ``hold.release``, with a reason).

Holds that have ended are released by the scheduler (:func:`expire_holds`, run by the beat task
``moderation.release_holds`` through :func:`moderation.governance.holds.release_expired_holds`),
audited ``hold.expire``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.governance.erasure_stores import as_utc, chunks, now_utc
from moderation.matching.recording import add_hold, place_block_hold
from moderation.storage.models import LegalHold, ReviewItem, Screening, Upload

if TYPE_CHECKING:
    from moderation.matching.policy import Policy

MAX_MANUAL_DAYS = 36500
"""Longest manual hold, days (100 years: the policy's own ``legal_hold_days`` bound)."""
RELEASE_ROLES: frozenset[str] = frozenset({"admin", "dpo"})
"""Console roles that place and release manual holds."""


class HoldError(Exception):
    """A hold operation was refused (unknown upload or hold, not manual, already released)."""


def hold_confirmed(
    session: Session, item: ReviewItem, policy: Policy, *, actor: str, origin: str | None = None
) -> LegalHold | None:
    """A reviewer confirmed ``item``: place the hold its category's block would place, or None
    when the category has no ``legal_hold_days``."""
    days = policy.rules_for(item.category or policy.default_category).legal_hold_days
    upload = session.get(Upload, item.upload_id)
    if not days or upload is None:
        return None
    return place_block_hold(
        session,
        upload,
        days=days,
        category=item.category,
        source="review",
        actor=actor,
        origin=origin,
    )


def place_manual_hold(
    session: Session,
    upload_id: str,
    *,
    days: int,
    reason: str,
    actor: str,
    origin: str | None = None,
) -> LegalHold:
    """Hold an upload by hand for ``days`` (1 to :data:`MAX_MANUAL_DAYS`); audited ``hold.place``.

    Raises:
        HoldError: no such upload, or ``days`` out of range.
        ValueError: empty ``reason``.
    """
    if not 1 <= days <= MAX_MANUAL_DAYS:
        raise HoldError(f"days must be between 1 and {MAX_MANUAL_DAYS}")
    upload = session.get(Upload, upload_id, with_for_update=True)
    if upload is None:
        raise HoldError(f"no upload {upload_id}")
    until = datetime.now(UTC) + timedelta(days=days)
    return add_hold(
        session, upload, source="manual", until=until, reason=reason, actor=actor, origin=origin
    )


def _recompute(session: Session, upload_id: str) -> None:
    """``legal_hold_until`` := the latest ``until`` of the upload's holds not released."""
    upload = session.get(Upload, upload_id)
    if upload is None:
        return
    untils = session.scalars(
        select(LegalHold.until).where(
            LegalHold.upload_id == upload_id, LegalHold.released_at.is_(None)
        )
    ).all()
    upload.legal_hold_until = max((as_utc(u) for u in untils), default=None)


def release_hold(
    session: Session, hold_id: int, *, reason: str, actor: str, origin: str | None = None
) -> LegalHold:
    """Release a manual hold before its end; audited ``hold.release``. Holds placed by a block
    or a confirm end only when they expire.

    Raises:
        HoldError: no such hold, not a manual hold, or already released.
        ValueError: empty ``reason``.
    """
    if not reason.strip():
        raise ValueError("releasing a legal hold needs a reason")
    hold = session.get(LegalHold, hold_id, with_for_update=True)
    if hold is None:
        raise HoldError(f"no legal hold {hold_id}")
    if hold.source != "manual":
        raise HoldError(f"hold {hold_id} was placed by a {hold.source} block: it ends on expiry")
    if hold.released_at is not None:
        raise HoldError(f"hold {hold_id} is already released")
    hold.released_at, hold.released_by = now_utc(), actor
    hold.release_reason = reason.strip()[:1000]
    session.flush()
    _recompute(session, hold.upload_id)
    record_event(
        session,
        actor=actor,
        action="hold.release",
        target=f"upload:{hold.upload_id}",
        origin=origin,
        details={"hold_id": hold.id, "reason": hold.release_reason},
    )
    return hold


def expire_holds(session: Session, *, actor: str, now: datetime | None = None) -> list[int]:
    """Release every hold whose ``until`` has passed (audited ``hold.expire``); their ids."""
    moment = now or now_utc()
    holds = session.scalars(
        select(LegalHold)
        .where(LegalHold.released_at.is_(None), LegalHold.until <= moment)
        .with_for_update()
    ).all()
    if not holds:
        return []
    for hold in holds:
        hold.released_at, hold.released_by, hold.release_reason = moment, actor, "expired"
    session.flush()
    for upload_id in sorted({h.upload_id for h in holds}):
        _recompute(session, upload_id)
    ids = [h.id for h in holds]
    record_event(
        session,
        actor=actor,
        action="hold.expire",
        target=f"legal_holds:{len(ids)}",
        details={"hold_ids": ids[:100], "uploads": len({h.upload_id for h in holds})},
    )
    return ids


def hold_row(hold: LegalHold) -> dict[str, Any]:
    """A hold as the CLI and the console list it (JSON-ready)."""
    return {
        "hold_id": hold.id,
        "upload_id": hold.upload_id,
        "source": hold.source,
        "reason": hold.reason,
        "placed_by": hold.placed_by,
        "placed_at": as_utc(hold.placed_at).isoformat(),
        "until": as_utc(hold.until).isoformat(),
        "released_at": as_utc(hold.released_at).isoformat() if hold.released_at else None,
        "released_by": hold.released_by,
        "release_reason": hold.release_reason,
    }


def list_holds(
    session: Session, *, include_released: bool = False, upload_id: str | None = None
) -> list[dict[str, Any]]:
    """Holds (newest first, at most 1000), active ones only unless ``include_released``."""
    query = select(LegalHold)
    if not include_released:
        query = query.where(LegalHold.released_at.is_(None))
    if upload_id is not None:
        query = query.where(LegalHold.upload_id == upload_id)
    rows = session.scalars(query.order_by(LegalHold.id.desc()).limit(1000))
    return [hold_row(h) for h in rows]


def held_items(
    session: Session, upload_ids: Sequence[str], citations: dict[str | None, str]
) -> list[dict[str, Any]]:
    """Each held upload an erasure kept back, for its receipt: ``upload_id``, ``category``,
    ``until``, ``citation`` (the policy's basis, from ``citations`` by category) and ``holds``
    (source, reason, placed_by, until of each hold not released)."""
    items: list[dict[str, Any]] = []
    for chunk in chunks(sorted(upload_ids)):
        rows = session.execute(
            select(Upload.id, Upload.legal_hold_until, Screening.category)
            .outerjoin(Screening, Screening.upload_id == Upload.id)
            .where(Upload.id.in_(chunk))
            .order_by(Upload.id)
        ).all()
        for uid, until, category in rows:
            holds = session.scalars(
                select(LegalHold)
                .where(LegalHold.upload_id == uid, LegalHold.released_at.is_(None))
                .order_by(LegalHold.id)
            ).all()
            items.append(
                {
                    "upload_id": uid,
                    "category": category,
                    "until": as_utc(until).isoformat() if until else None,
                    "citation": citations.get(category),
                    "holds": [
                        {k: hold_row(h)[k] for k in ("source", "reason", "placed_by", "until")}
                        for h in holds
                    ],
                }
            )
    return items
