"""Erasure requests (GDPR Art. 17) and their deadlines: registering, listing, overdue ones.

Owns the ``erasure_requests`` rows up to the point where
:func:`moderation.governance.gdpr.erase_subject` works through them: an open request per data
subject (found by the subject's keyed lookup hash), its initial work list (:func:`empty_plan`),
the ``gdpr.request`` audit event, and the views of requests for the CLI, the console and the
dashboard (GDPR Art. 12(3) deadlines).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.governance.erasure_stores import as_utc, erasure_lock, now_utc, zero_counts
from moderation.service.subjects import lookup_key
from moderation.storage.db import transaction
from moderation.storage.models import ErasureRequest, Subject, new_uuid

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


def open_request(session: Session, lookup: str) -> ErasureRequest | None:
    """The oldest request not yet done for the subject with this lookup hash, if any."""
    return session.scalar(
        select(ErasureRequest)
        .where(ErasureRequest.lookup == lookup, ErasureRequest.state != "done")
        .order_by(ErasureRequest.received_at)
    )


def empty_plan() -> dict[str, Any]:
    """A new request's work list: nothing planned, nothing counted yet."""
    return {
        "erase": [],
        "held": [],
        "entries": [],
        "blobs": [],
        "counts": zero_counts(),
        "held_kept": {},
        "exceptions": [],
        "subject_known": False,
        "snapshot_version": None,
    }


def new_request(
    session: Session, lookup: str, subject: Subject | None, *, actor: str, state: str
) -> ErasureRequest:
    """Add a request row in ``state`` and audit it (``gdpr.request``); the caller commits."""
    request = ErasureRequest(
        id=new_uuid(),
        subject_ref=subject.ref if subject else "",
        requested_by=actor,
        lookup=lookup,
        state=state,
        receipt={},
        plan=empty_plan(),
    )
    session.add(request)
    session.flush()
    record_event(
        session,
        actor=actor,
        action="gdpr.request",
        target=f"erasure:{request.id}",
        details={"subject_ref": subject.ref if subject else None},
    )
    logger.info("erasure request %s registered", request.id)
    return request


def register_request(runtime: Runtime, subject_id: str, *, actor: str) -> str:
    """Record that an erasure request was received (its deadline starts now); returns its id.

    Idempotent: an open request for the same subject is returned instead of a new one.

    Raises:
        ValueError: empty subject id.
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    with transaction(runtime.sessions) as session:
        erasure_lock(session)
        lookup = lookup_key(session, runtime.keyring, subject_id)
        request = open_request(session, lookup)
        if request is None:
            subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
            request = new_request(session, lookup, subject, actor=actor, state="pending")
        return request.id


def overdue_requests(session: Session, days: int = 25) -> list[dict[str, Any]]:
    """Open erasure requests received more than ``days`` ago, oldest first (for the dashboard).

    GDPR Art. 12(3) allows one month; the default leaves a few days' margin. Each item:
    ``id``, ``state``, ``received_at`` (ISO 8601), ``age_days``, ``requested_by``.
    """
    now = now_utc()
    rows = session.scalars(
        select(ErasureRequest)
        .where(ErasureRequest.state != "done", ErasureRequest.received_at < now - timedelta(days))
        .order_by(ErasureRequest.received_at)
    )
    return [
        {
            "id": r.id,
            "state": r.state,
            "received_at": as_utc(r.received_at).isoformat(),
            "age_days": (now - as_utc(r.received_at)).days,
            "requested_by": r.requested_by,
        }
        for r in rows
    ]


def list_requests(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    """Recent erasure requests, newest first: id, state, dates and the receipt's counts."""
    rows = session.scalars(
        select(ErasureRequest).order_by(ErasureRequest.received_at.desc()).limit(limit)
    )
    return [
        {
            "id": r.id,
            "state": r.state,
            "received_at": as_utc(r.received_at).isoformat(),
            "completed_at": as_utc(r.completed_at).isoformat() if r.completed_at else None,
            "requested_by": r.requested_by,
            "counts": r.receipt.get("counts") if r.receipt else None,
        }
        for r in rows
    ]
