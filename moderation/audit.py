"""Append-only audit log kept as a SHA-256 hash chain.

Every state-changing action appends one :class:`~moderation.storage.models.AuditEvent` in the
same database transaction as the change (STYLE.md rule 11): if the event cannot be written, the
action fails with it. Each event's ``hash`` is SHA-256 over the previous event's hash and the
event's canonical JSON (RFC 8785-style: sorted keys, no insignificant whitespace, UTF-8), so
editing, inserting or deleting a row breaks the chain from that row on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from moderation.storage.models import AuditEvent

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event."""

# Arbitrary constant naming the PostgreSQL advisory lock that serialises audit writers, so
# concurrent transactions append one linear chain (RELIABILITY.md A5).
_AUDIT_LOCK_KEY = 0x6D6F645F61756474  # "mod_audt"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact separators, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _timestamp(ts: datetime) -> str:
    # SQLite drops tzinfo on the way back; events are always written in UTC.
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def event_body(event: AuditEvent) -> dict[str, Any]:
    """The hashed fields of an event, as plain JSON values."""
    return {
        "seq": event.seq,
        "ts": _timestamp(event.ts),
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "origin": event.origin,
        "outcome": event.outcome,
        "details": event.details,
        "prev_hash": event.prev_hash,
    }


def compute_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """SHA-256 hex of ``prev_hash`` (hex) followed by the canonical JSON of ``body``."""
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(prev_hash))
    digest.update(canonical_json(body))
    return digest.hexdigest()


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _AUDIT_LOCK_KEY})
    # SQLite: every transaction already begins IMMEDIATE (moderation.storage.db), which holds
    # the database write lock until commit.


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    origin: str | None = None,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit event inside the caller's transaction and return it (flushed).

    Args:
        actor: who acted: ``user:<id>``, ``client:<id>`` or a component (``cli``, ``worker``).
        action: dotted verb, e.g. ``bank.create``, ``keys.rotate``, ``review.decide``.
        target: what was acted on, e.g. ``bank:3``; never a raw data-subject id.
        origin: where from: a client address or a component name.
        outcome: ``success``, ``failure`` or ``denied``.
        details: JSON-serialisable context (no secrets, no raw subject ids).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the event could not be written; the caller's
            transaction must then fail as a whole.
        ValueError: ``details`` is not JSON-serialisable.
    """
    _lock_chain(session)
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    event = AuditEvent(
        seq=seq,
        ts=datetime.now(UTC),
        actor=actor,
        action=action,
        target=target,
        origin=origin,
        outcome=outcome,
        details=json.loads(canonical_json(details or {})),
        prev_hash=prev_hash,
    )
    event.hash = compute_hash(prev_hash, event_body(event))
    session.add(event)
    session.flush()
    logger.debug("audit %s %s %s -> seq %d", actor, action, target, seq)
    return event
