"""Append-only audit log: a SHA-256 hash chain with Ed25519-signed checkpoints.

Every state-changing action appends one :class:`~moderation.storage.models.AuditEvent` in the
same database transaction as the change (STYLE.md rule 11): if the event cannot be written, the
action fails with it. Each event's ``hash`` is SHA-256 over the previous event's hash and the
event's canonical JSON (:mod:`moderation.audit.offline` defines both, so an auditor can check
exports without this package), so editing, inserting or deleting a row breaks the chain from that
row on.

A hash chain alone cannot show that its tail was cut off, and anyone who can write the table
can recompute it. So the head (sequence, hash) is periodically signed with the deployment's
Ed25519 audit key into ``audit_checkpoints`` (:func:`write_checkpoint`): deleting events up to
the last checkpoint, or rewriting the chain under it, is detected by
:func:`moderation.audit.verify.verify_chain`.

Where the key lives: a 32-byte Ed25519 seed in ``deployment_secrets`` (name
:data:`SIGNING_KEY_NAME`), wrapped (AES-256-GCM) by the master key ring like every other data
key; master-key rotation re-wraps it (``moderation.governance.keys`` step ``deployment_secrets``).
Someone with write access to the database but not the master keys cannot sign, and
:func:`~moderation.audit.verify.verify_chain` pins the public key derived from the deployment's
own secret (never the key stored beside a checkpoint). ``moderation audit public-key`` prints it
for offline use. Exports of a time window are :mod:`moderation.audit.export`.

On PostgreSQL the migration ``0005`` installs triggers that reject UPDATE, DELETE and TRUNCATE
on ``audit_events`` and ``audit_checkpoints`` (RELIABILITY.md A1); SQLite gets the same guard
for UPDATE and DELETE.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from moderation.audit.offline import (
    CHECKPOINT_TYPE,
    GENESIS_HASH,
    canonical_json,
    compute_hash,
    signed_bytes,
)
from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.storage.models import AuditCheckpoint, AuditEvent, DeploymentSecret

__all__ = [
    "GENESIS_HASH",
    "SIGNING_KEY_NAME",
    "AuditKeyError",
    "canonical_json",
    "checkpoint_if_due",
    "compute_hash",
    "event_body",
    "public_key_hex",
    "record_event",
    "sign_document",
    "signing_key",
    "stream_events",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

SIGNING_KEY_NAME = "audit-signing-key"
"""``deployment_secrets.name`` of the wrapped Ed25519 seed."""

# Arbitrary constant naming the PostgreSQL advisory lock that serialises audit writers, so
# concurrent transactions append one linear chain (RELIABILITY.md A5).
_AUDIT_LOCK_KEY = 0x6D6F645F61756474  # "mod_audt"
_VERIFY_BATCH = 1000


class AuditKeyError(Exception):
    """The audit signing key is missing or unusable (e.g. its row was deleted)."""


def _timestamp(ts: datetime) -> str:
    # SQLite drops tzinfo on the way back; events are always written in UTC.
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


class EventFields(Protocol):
    """An :class:`AuditEvent` or a row selecting its columns."""

    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def actor(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def target(self) -> str | None: ...
    @property
    def origin(self) -> str | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def details(self) -> dict[str, Any]: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


_EVENT_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.ts,
    AuditEvent.actor,
    AuditEvent.action,
    AuditEvent.target,
    AuditEvent.origin,
    AuditEvent.outcome,
    AuditEvent.details,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def event_body(event: EventFields) -> dict[str, Any]:
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


def stream_events(
    session: Session, after: int = 0, upto: int | None = None
) -> Iterator[EventFields]:
    """Events with ``after`` < seq <= ``upto``, in seq order, as plain column rows.

    Read in keyset-paginated batches of 1000, so memory stays flat and the caller's session
    (identity map, pending objects) is left alone.
    """
    # Plain column rows in keyset-paginated batches: memory stays flat and the caller's
    # session (identity map, pending objects) is left alone.
    last = after
    while True:
        query = select(*_EVENT_COLUMNS).where(AuditEvent.seq > last)
        if upto is not None:
            query = query.where(AuditEvent.seq <= upto)
        batch = session.execute(query.order_by(AuditEvent.seq).limit(_VERIFY_BATCH)).all()
        if not batch:
            return
        yield from batch
        last = batch[-1].seq


@lru_cache(maxsize=1)
def default_origin() -> str:
    """Where a component's events come from when the caller gives no address: this host."""
    return f"host:{socket.gethostname()}"


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _AUDIT_LOCK_KEY})
    # SQLite: every write transaction (storage.db.transaction) begins IMMEDIATE, which holds
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
        origin: where from: a client address, else this host (:func:`default_origin`).
        outcome: ``success``, ``failure`` or ``denied``.
        details: JSON-serialisable context (no secrets, no raw subject ids).

    Empty ``target``/``origin`` strings are stored as null, so CSV exports stay unambiguous.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the event could not be written; the caller's
            transaction must then fail as a whole.
        ValueError, TypeError: ``details`` is not JSON-serialisable.
    """
    details_json = canonical_json(details or {})
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
        target=target or None,
        origin=origin or default_origin(),
        outcome=outcome,
        details=json.loads(details_json),
        prev_hash=prev_hash,
    )
    event.hash = compute_hash(prev_hash, event_body(event))
    session.add(event)
    session.flush()
    logger.debug("audit seq %d: %s %s %s", seq, actor, action, target)
    return event


# --- signing key ----------------------------------------------------------------------------


def _key_context() -> str:
    # The same context moderation.service.subjects.deployment_secret uses, so the generic
    # "deployment_secrets" re-wrap step of moderation.governance.keys covers this key too.
    return f"deployment-secret:{SIGNING_KEY_NAME}"


def signing_key(
    session: Session, keyring: KeyRing, *, create: bool = False, actor: str = "system"
) -> Ed25519PrivateKey:
    """The deployment's Ed25519 audit signing key (RFC 8032), unwrapped in memory.

    With ``create``, a missing key is generated (32 random bytes), stored wrapped by the
    primary master key, and its public key recorded in an ``audit.signing_key.create`` event (by
    ``actor``) so the chain itself remembers it.

    Raises:
        AuditKeyError: the key does not exist and ``create`` is false.
        moderation.crypto.errors.CryptoError: the wrapped seed does not unwrap (wrong master keys).
    """
    row = session.get(DeploymentSecret, SIGNING_KEY_NAME)
    if row is None:
        if not create:
            raise AuditKeyError(
                "the audit signing key does not exist: run `moderation init` (or any command "
                "that writes a checkpoint); if it existed before, its row was deleted"
            )
        seed = generate_data_key()
        session.add(
            DeploymentSecret(
                name=SIGNING_KEY_NAME,
                wrapped=wrap_key(seed, keyring, context=_key_context()).to_bytes(),
            )
        )
        session.flush()
        key = Ed25519PrivateKey.from_private_bytes(seed)
        record_event(
            session,
            actor=actor,
            action="audit.signing_key.create",
            target=f"deployment_secret:{SIGNING_KEY_NAME}",
            details={"public_key": public_key_hex(key)},
        )
        logger.info("created the audit signing key %s", public_key_hex(key))
        return key
    seed = unwrap_key(WrappedKey.from_bytes(row.wrapped), keyring, context=_key_context())
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte Ed25519 public key as 64 hex characters."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign_document(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``document`` with ``public_key`` and an Ed25519 ``signature`` (hex) added.

    The signature covers the canonical JSON of everything but ``signature`` (see
    :mod:`moderation.audit.offline`); ``document`` must carry a ``type``.

    Raises:
        ValueError: no ``type`` field, or the document is not JSON-serialisable.
    """
    if "type" not in document:
        raise ValueError("a signed document needs a 'type' field")
    signed = {k: v for k, v in document.items() if k != "signature"}
    signed["public_key"] = public_key_hex(key)
    signed["signature"] = key.sign(signed_bytes(signed)).hex()
    return signed


# --- checkpoints ----------------------------------------------------------------------------


def _head(session: Session) -> tuple[int, str] | None:
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return (int(row[0]), str(row[1])) if row else None


def _last_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.scalar(
        select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc(), AuditCheckpoint.id.desc())
    )


def checkpoint_document(seq: int, head_hash: str) -> dict[str, Any]:
    """The signed content of a checkpoint (before ``public_key`` and ``signature``)."""
    return {"type": CHECKPOINT_TYPE, "seq": seq, "head_hash": head_hash}


def write_checkpoint(
    session: Session, keyring: KeyRing, *, key: Ed25519PrivateKey | None = None
) -> AuditCheckpoint | None:
    """Sign the current head (sequence, hash) into ``audit_checkpoints``.

    Takes the chain lock, so the head cannot move while it is signed. Returns None when there
    is no event yet or the head is already checkpointed. Creates the signing key if missing.

    Raises:
        moderation.crypto.errors.CryptoError: the signing key does not unwrap.
    """
    key = key or signing_key(session, keyring, create=True)
    _lock_chain(session)
    head = _head(session)
    last = _last_checkpoint(session)
    if head is None or (last is not None and last.seq >= head[0]):
        return None
    signed = sign_document(checkpoint_document(*head), key)
    checkpoint = AuditCheckpoint(
        seq=head[0],
        head_hash=head[1],
        signature=signed["signature"],
        public_key=signed["public_key"],
    )
    session.add(checkpoint)
    session.flush()
    logger.info("audit checkpoint at seq %d", head[0])
    return checkpoint


def checkpoint_if_due(
    session: Session,
    keyring: KeyRing,
    *,
    every: int,
    max_age: timedelta | None = None,
) -> AuditCheckpoint | None:
    """Write a checkpoint when ``every`` or more events were appended since the last one, or
    (with ``max_age``) when any event is newer than a last checkpoint older than ``max_age``.

    Meant for a periodic maintenance task (``moderation audit checkpoint --if-due`` from cron,
    or the workers' beat schedule): tail truncation is detected only up to the last checkpoint,
    so ``every`` bounds how many events can vanish unnoticed, and ``max_age`` how long a quiet
    deployment's tail stays unsigned.
    """
    head = _head(session)
    last = _last_checkpoint(session)
    pending = 0 if head is None else head[0] - (last.seq if last else 0)
    if pending <= 0:
        return None
    if pending >= every:
        return write_checkpoint(session, keyring)
    if max_age is not None:
        signed_at = last.created_at if last else None
        if signed_at is not None and signed_at.tzinfo is None:
            signed_at = signed_at.replace(tzinfo=UTC)
        if signed_at is None or datetime.now(UTC) - signed_at >= max_age:
            return write_checkpoint(session, keyring)
    return None
