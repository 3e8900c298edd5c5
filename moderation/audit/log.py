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
the last checkpoint, or rewriting the chain under it, is detected by :func:`verify_chain`.

Where the key lives: a 32-byte Ed25519 seed in ``deployment_secrets`` (name
:data:`SIGNING_KEY_NAME`), wrapped (AES-256-GCM) by the master key ring like every other data
key; master-key rotation re-wraps it (``moderation.governance.keys`` step ``deployment_secrets``).
Someone
with write access to the database but not the master keys cannot sign, and :func:`verify_chain`
pins the public key derived from the deployment's own secret (never the key stored beside a
checkpoint). ``moderation audit public-key`` prints it for offline use.

On PostgreSQL the migration ``0005`` installs triggers that reject UPDATE, DELETE and TRUNCATE
on ``audit_events`` and ``audit_checkpoints`` (RELIABILITY.md A1); SQLite gets the same guard
for UPDATE and DELETE.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, BinaryIO, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from moderation.audit.offline import (
    CHECKPOINT_TYPE,
    CSV_COLUMNS,
    GENESIS_HASH,
    MANIFEST_TYPE,
    canonical_json,
    compute_hash,
    escape_cell,
    load_public_key,
    signed_bytes,
    verify_signature,
)
from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.storage.models import AuditCheckpoint, AuditEvent, DeploymentSecret

__all__ = [
    "GENESIS_HASH",
    "SIGNING_KEY_NAME",
    "AuditKeyError",
    "VerifyResult",
    "canonical_json",
    "checkpoint_if_due",
    "compute_hash",
    "event_body",
    "export_events",
    "public_key_hex",
    "record_event",
    "sign_document",
    "signing_key",
    "verify_chain",
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


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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


@lru_cache(maxsize=1)
def default_origin() -> str:
    """Where a component's events come from when the caller gives no address: this host."""
    return f"host:{socket.gethostname()}"


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


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`.

    Attributes:
        ok: the chain and every checkpoint verify.
        count: events examined.
        first_bad_seq: the first sequence number that is wrong, missing or unanchored.
        problem: what is wrong, for people.
        head_seq, head_hash: the last event examined.
        checkpoints: signed checkpoints that verified.
        public_key: the key checkpoints were checked against (hex), if any.
        key_pinned: True when that key came from the caller or the deployment's own secret;
            False when only the keys stored beside the checkpoints were available (then a
            writer of the database could have re-signed them).
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    checkpoints: int = 0
    public_key: str | None = None
    key_pinned: bool = False


def _stream_events(
    session: Session, after: int = 0, upto: int | None = None
) -> Iterator[EventFields]:
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


def _pinned_key(
    session: Session,
    public_key: str | bytes | Ed25519PublicKey | None,
    keyring: KeyRing | None,
) -> Ed25519PublicKey | None:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, bytes):
        return Ed25519PublicKey.from_public_bytes(public_key)
    if isinstance(public_key, str):
        return load_public_key(public_key)
    if keyring is not None:
        try:
            return signing_key(session, keyring).public_key()
        except AuditKeyError:
            return None
    return None


def verify_chain(
    session: Session,
    *,
    public_key: str | bytes | Ed25519PublicKey | None = None,
    keyring: KeyRing | None = None,
) -> VerifyResult:
    """Walk the whole chain and the signed checkpoints; report the first bad sequence number.

    Detects an edited event (its hash no longer matches: reported at its own seq), a deleted
    middle event (a gap: reported at the missing seq), an inserted or re-linked event (its
    ``prev_hash`` does not match its predecessor), a chain rewritten under a checkpoint, and a
    truncated tail (the last signed checkpoint lies beyond the last event: reported at the
    first missing seq). Events appended after the last checkpoint by someone recomputing the
    hashes cannot be told from genuine ones: checkpoints bound that window.

    Args:
        public_key: the audit public key to pin (hex, raw bytes or a key object), e.g. one kept
            offline from ``moderation audit public-key``.
        keyring: the master keys; the public key is then derived from the deployment's own
            signing secret. The console and the CLI pass this.

    With neither, checkpoints are checked against the key stored beside them, which all must
    share; ``key_pinned`` is then False. Reads only.

    Raises:
        ValueError: ``public_key`` is malformed.
        moderation.crypto.errors.CryptoError: the signing secret does not unwrap under ``keyring``.
    """
    pinned = _pinned_key(session, public_key, keyring)
    checkpoints = list(
        session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq, AuditCheckpoint.id))
    )
    if keyring is not None and pinned is None and checkpoints:
        return VerifyResult(
            False,
            0,
            checkpoints[0].seq,
            "the audit signing key is missing from deployment_secrets although signed "
            "checkpoints exist: it was deleted",
            checkpoints=0,
        )
    key_hex = public_key_hex(pinned) if pinned is not None else None
    anchors: dict[int, str] = {}
    for cp in checkpoints:
        key = pinned
        if key is None:
            if key_hex is None:
                key_hex = cp.public_key
            if cp.public_key != key_hex:
                return VerifyResult(
                    False,
                    0,
                    cp.seq,
                    f"checkpoint {cp.id} (seq {cp.seq}) is signed by another key "
                    f"({cp.public_key}) than the earlier checkpoints ({key_hex})",
                    public_key=key_hex,
                )
            key = load_public_key(cp.public_key)
        document = {
            **checkpoint_document(cp.seq, cp.head_hash),
            "public_key": cp.public_key,
            "signature": cp.signature,
        }
        if verify_signature(document, key, expected_type=CHECKPOINT_TYPE) is not None:
            return VerifyResult(
                False,
                0,
                cp.seq,
                f"checkpoint {cp.id} (seq {cp.seq}): the Ed25519 signature does not verify "
                f"under the audit key {key_hex}",
                public_key=key_hex,
                key_pinned=pinned is not None,
            )
        if anchors.get(cp.seq, cp.head_hash) != cp.head_hash:
            return VerifyResult(
                False, 0, cp.seq, f"two signed checkpoints disagree about seq {cp.seq}"
            )
        anchors[cp.seq] = cp.head_hash

    def result(
        ok: bool, count: int, bad: int | None = None, problem: str | None = None
    ) -> VerifyResult:
        return VerifyResult(
            ok,
            count,
            bad,
            problem,
            head_seq=head_seq,
            head_hash=prev_hash if count else None,
            checkpoints=len(anchors),
            public_key=key_hex,
            key_pinned=pinned is not None,
        )

    prev_hash = GENESIS_HASH
    expected = 1
    head_seq: int | None = None
    last_anchor = 0
    count = 0
    for event in _stream_events(session):
        if event.seq != expected:
            return result(
                False,
                count,
                expected,
                f"seq {expected} is missing (the next event is seq {event.seq}): "
                "events were deleted",
            )
        if event.prev_hash != prev_hash:
            return result(
                False,
                count,
                event.seq,
                f"seq {event.seq}: prev_hash does not match the hash of seq {event.seq - 1} "
                "(an event was inserted or re-linked)",
            )
        if compute_hash(prev_hash, event_body(event)) != event.hash:
            return result(
                False,
                count,
                event.seq,
                f"seq {event.seq}: hash mismatch (the event was edited after it was written)",
            )
        anchored = anchors.get(event.seq)
        if anchored is not None:
            if anchored != event.hash:
                return result(
                    False,
                    count,
                    last_anchor + 1,
                    f"seq {last_anchor + 1}..{event.seq} were rewritten: seq {event.seq} does "
                    "not match its signed checkpoint",
                )
            last_anchor = event.seq
        prev_hash, head_seq, expected = event.hash, event.seq, expected + 1
        count += 1
    last_signed = max(anchors, default=0)
    if last_signed >= expected:
        return result(
            False,
            count,
            expected,
            f"events from seq {expected} on are missing: a signed checkpoint covers seq "
            f"{last_signed} (the tail was truncated)",
        )
    return result(True, count)


# --- exports --------------------------------------------------------------------------------

ExportFormat = Literal["jsonl", "csv"]


def _csv_line(body: dict[str, Any], event_hash: str) -> bytes:
    buffer = io.StringIO()
    cells: list[str] = []
    for column in CSV_COLUMNS:
        value = event_hash if column == "hash" else body[column]
        if column == "details":
            cells.append(canonical_json(value).decode("utf-8"))
        elif column == "seq":
            cells.append(str(value))
        elif value is None:
            cells.append("")
        else:
            cells.append(escape_cell(str(value)))
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue().encode("utf-8")


def _seq_range(
    session: Session, since: datetime | None, until: datetime | None
) -> tuple[int | None, int | None]:
    query = select(func.min(AuditEvent.seq), func.max(AuditEvent.seq))
    if since is not None:
        query = query.where(AuditEvent.ts >= _utc(since))
    if until is not None:
        query = query.where(AuditEvent.ts < _utc(until))
    low, high = session.execute(query).one()
    return low, high


def export_events(
    session: Session,
    *,
    fmt: ExportFormat,
    since: datetime | None,
    until: datetime | None,
    out: BinaryIO,
    actor: str,
    signing_key: Ed25519PrivateKey,
    origin: str | None = None,
) -> dict[str, Any]:
    """Write the events of a time window to ``out`` and return the signed manifest.

    The window is [``since``, ``until``) in event time (naive datetimes are UTC); every event
    between the first and the last one in it is exported, so the file is one contiguous piece
    of the chain. Lines are written as they are read (memory stays flat). The export itself is
    audited (``audit.export``, in the caller's transaction: commit it).

    Manifest fields: ``type`` (``moderation-audit-export/1``), ``file_format``,
    ``file_sha256``, ``file_bytes``, ``count``, ``first_seq``, ``last_seq``,
    ``first_prev_hash``, ``head_hash`` (hash of the last exported event), ``since``,
    ``until``, ``exported_at``, ``exported_by``, ``export_event_seq``, ``public_key`` and
    ``signature`` (Ed25519 over the rest; verify with :mod:`moderation.audit.offline`).

    Raises:
        ValueError: unknown ``fmt``.
        OSError: ``out`` cannot be written.
    """
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format must be 'jsonl' or 'csv', not {fmt!r}")
    low, high = _seq_range(session, since, until)
    digest = hashlib.sha256()
    size = count = 0
    first_prev: str | None = None
    head_hash: str | None = None
    last_seq: int | None = None

    def emit(data: bytes) -> None:
        nonlocal size
        out.write(data)
        digest.update(data)
        size += len(data)

    if fmt == "csv":
        header = io.StringIO()
        csv.writer(header, lineterminator="\r\n").writerow(CSV_COLUMNS)
        emit(header.getvalue().encode("utf-8"))
    if low is not None and high is not None:
        for row in _stream_events(session, after=low - 1, upto=high):
            body = event_body(row)
            if first_prev is None:
                first_prev = row.prev_hash
            if fmt == "jsonl":
                emit(canonical_json({**body, "hash": row.hash}) + b"\n")
            else:
                emit(_csv_line(body, row.hash))
            head_hash, last_seq = row.hash, row.seq
            count += 1
    out.flush()
    manifest: dict[str, Any] = {
        "type": MANIFEST_TYPE,
        "file_format": fmt,
        "file_sha256": digest.hexdigest(),
        "file_bytes": size,
        "count": count,
        "first_seq": low if count else None,
        "last_seq": last_seq,
        "first_prev_hash": first_prev,
        "head_hash": head_hash,
        "since": _utc(since).isoformat() if since else None,
        "until": _utc(until).isoformat() if until else None,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "exported_by": actor,
    }
    event = record_event(
        session,
        actor=actor,
        action="audit.export",
        target=f"audit:{low}-{last_seq}" if count else "audit:empty",
        origin=origin,
        details={
            "format": fmt,
            "count": count,
            "first_seq": manifest["first_seq"],
            "last_seq": last_seq,
            "file_sha256": manifest["file_sha256"],
            "since": manifest["since"],
            "until": manifest["until"],
        },
    )
    manifest["export_event_seq"] = event.seq
    logger.info("audit export: %d events (%s) by %s", count, fmt, actor)
    return sign_document(manifest, signing_key)
