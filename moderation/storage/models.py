"""SQLAlchemy 2 models: the data model of ARCHITECTURE.md.

Vectors and PDQ digests never appear here: they exist only inside encrypted index snapshots.
Times are timezone-aware UTC. Ids exposed over the API are strings (``e_12`` for entries,
UUID hex for uploads).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false as sa_false

# Stable constraint names, so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_uuid() -> str:
    """A random UUID as 32 hex characters."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's documented class attribute
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


# --- blocklist ------------------------------------------------------------------------------


class Bank(Base):
    """A named list of known images: ``block`` banks flag matches, ``allow`` banks suppress."""

    __tablename__ = "banks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="block")  # block | allow
    category: Mapped[str] = mapped_column(String(100), default="default")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Opt-in originals vault (moderation.banks.originals): each entry's original kept sealed
    # under its own data key, so an encoder migration can re-embed it.
    retain_originals: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=sa_false()
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Tenancy (moderation.banks.tenancy): the API client owning the bank (None: the
    # deployment's own bank); it applies to, and is named to, its owner, the clients in
    # ``bank_shares``, and every client when ``shared_with_all``.
    owner_client_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_clients.id", ondelete="RESTRICT"), index=True
    )
    shared_with_all: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    # Data key sealing the bank's entry labels and source refs, wrapped by a master key
    # (moderation.banks.sealed_fields); created with the first entry.
    entry_key: Mapped[bytes | None] = mapped_column(LargeBinary)

    entries: Mapped[list[Entry]] = relationship(back_populates="bank")


class Entry(Base):
    """One image in a bank: metadata only (its vector and PDQ live in the encrypted snapshot)."""

    __tablename__ = "entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"), index=True)
    # Label and source ref (a file name, URL), AES-256-GCM under the bank's entry key: read
    # them with moderation.banks.sealed_fields.entry_fields, never from SQL.
    label_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    source_ref_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Keyed SHA-256 (HMAC, hex) of the original file's bytes: lets an import skip exact
    # duplicates without storing a plain hash list of the banned set.
    source_hmac: Mapped[str | None] = mapped_column(String(64), index=True)
    # Set when the entry was made from a user upload (review confirm): erasure follows it.
    upload_id: Mapped[str | None] = mapped_column(String(32), index=True)
    added_by: Mapped[str] = mapped_column(String(200), default="cli")
    added_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where its signals came from: "image" (an imported or reviewed image: embedding, regions,
    # PDQ) or "hash_list" (a PDQ digest and/or keyed exact hashes, no embedding).
    origin: Mapped[str] = mapped_column(String(20), default="image", server_default="image")
    # Set while the entry is quarantined (flood control): its matches are sent to review and
    # never block, until an admin confirms (clears it, entry stays) or releases it.
    quarantined_at: Mapped[datetime | None] = mapped_column()
    quarantine_reason: Mapped[str | None] = mapped_column(String(500))
    # The UTC day an admin last confirmed the entry out of quarantine: flood control leaves it
    # alone for the rest of that day (moderation.banks.flood_control).
    quarantine_confirmed_on: Mapped[date | None] = mapped_column(Date)

    bank: Mapped[Bank] = relationship(back_populates="entries")

    @property
    def public_id(self) -> str:
        """The id shown in APIs and CLI output, ``e_<n>``."""
        return f"e_{self.id}"


class EntryMatchCount(Base):
    """How many screenings matched one entry on one UTC day (flood control counts)."""

    __tablename__ = "entry_match_counts"

    entry_id: Mapped[int] = mapped_column(
        ForeignKey("entries.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    matches: Mapped[int] = mapped_column(Integer, default=0)


class IndexSnapshot(Base):
    """One encrypted snapshot version, full or a delta (moderation.banks.delta_chain)."""

    __tablename__ = "index_snapshots"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    snapshot_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_uuid)
    encoder_id: Mapped[str] = mapped_column(String(500))
    key_id: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    entry_count: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    base_version: Mapped[int | None] = mapped_column(Integer, default=None)
    changed_entries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    compacted_from: Mapped[int | None] = mapped_column(Integer, default=None)


# --- uploads and results ---------------------------------------------------------------------


class Upload(Base):
    """One image submitted for screening (CLI or HTTP hook); its bytes are an encrypted blob."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("client_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    external_id: Mapped[str | None] = mapped_column(String(500), index=True)
    subject_ref: Mapped[str | None] = mapped_column(String(64), index=True)  # pseudonym
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_clients.id", ondelete="SET NULL"), index=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    callback_url: Mapped[str | None] = mapped_column(String(2000))
    source: Mapped[str] = mapped_column(String(16), default="cli")  # cli | api
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # queued | processing | done
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    blob_ref: Mapped[str | None] = mapped_column(String(200))
    # The upload's data key wrapped by a master key; deleting it crypto-shreds the blob.
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str | None] = mapped_column(String(100))
    # Keyed SHA-256 (HMAC, hex) of the bytes (moderation.banks.sealed_fields.content_hmac).
    content_hmac: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    legal_hold_until: Mapped[datetime | None] = mapped_column()
    # Set when an erasure request found this upload under legal hold: the upload is detached
    # from its subject and erased by ``moderation.governance.holds.release_expired_holds`` once the
    # hold ends.
    erasure_request_id: Mapped[str | None] = mapped_column(String(32), index=True)


class LegalHold(Base):
    """One legal hold on an upload: placed by a block (``automatic``), a reviewer's confirm
    (``review``) or by hand (``manual``, with a reason); ``Upload.legal_hold_until`` is the
    latest ``until`` of its holds not yet released (``moderation.governance.legal_holds``)."""

    __tablename__ = "legal_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # automatic | review | manual
    reason: Mapped[str] = mapped_column(String(1000))
    placed_by: Mapped[str] = mapped_column(String(200))
    placed_at: Mapped[datetime] = mapped_column(default=utcnow)
    until: Mapped[datetime] = mapped_column(index=True)
    released_at: Mapped[datetime | None] = mapped_column()
    released_by: Mapped[str | None] = mapped_column(String(200))
    release_reason: Mapped[str | None] = mapped_column(String(1000))


class Screening(Base):
    """The result for one upload: exactly one row per upload."""

    __tablename__ = "screenings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str] = mapped_column(
        ForeignKey("uploads.id", ondelete="CASCADE"), unique=True
    )
    decision: Mapped[str] = mapped_column(String(16), index=True)  # allow|review|block|unscannable
    policy: Mapped[str] = mapped_column(String(100))
    category: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(String(200))
    encoder_id: Mapped[str | None] = mapped_column(String(500))
    index_version: Mapped[int | None] = mapped_column(Integer)
    classifier_version: Mapped[str | None] = mapped_column(String(100))
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    explanation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    matches: Mapped[list[Match]] = relationship(
        back_populates="screening", cascade="all, delete-orphan", passive_deletes=True
    )


class Match(Base):
    """One entry a screening matched, with the signals that matched it."""

    __tablename__ = "matches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    screening_id: Mapped[int] = mapped_column(
        ForeignKey("screenings.id", ondelete="CASCADE"), index=True
    )
    entry_id: Mapped[int | None] = mapped_column(
        ForeignKey("entries.id", ondelete="SET NULL"), index=True
    )
    bank_id: Mapped[int | None] = mapped_column(ForeignKey("banks.id", ondelete="SET NULL"))
    cosine: Mapped[float | None] = mapped_column(Float)
    pdq_distance: Mapped[int | None] = mapped_column(Integer)
    probability: Mapped[float | None] = mapped_column(Float)
    signals: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    screening: Mapped[Screening] = relationship(back_populates="matches")


# --- review ----------------------------------------------------------------------------------


class ReviewItem(Base):
    """An uncertain screening waiting for (or settled by) a human reviewer."""

    __tablename__ = "review_items"
    __table_args__ = (Index("ix_review_items_queue", "state", "priority", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str] = mapped_column(
        ForeignKey("uploads.id", ondelete="CASCADE"), unique=True
    )
    category: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer, default=50)  # higher first
    state: Mapped[str] = mapped_column(String(16), default="open")  # open|claimed|decided|escalated
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    lease_until: Mapped[datetime | None] = mapped_column()
    decision: Mapped[str | None] = mapped_column(String(32))  # confirm | not_a_match | escalate
    # The API client whose upload this is (None: CLI/console uploads); queues filter on it.
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_clients.id", ondelete="SET NULL"), index=True
    )
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    decided_at: Mapped[datetime | None] = mapped_column()
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabelledPair(Base):
    """A (upload, entry) pair labelled copy / not copy, for training the classifier stage."""

    __tablename__ = "labelled_pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str | None] = mapped_column(
        ForeignKey("uploads.id", ondelete="CASCADE"), index=True
    )
    entry_id: Mapped[int | None] = mapped_column(
        ForeignKey("entries.id", ondelete="CASCADE"), index=True
    )
    is_copy: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(32))  # review | synthetic
    # Pair features (JSON numbers only: no vectors), so retraining needs no original image.
    features: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ClassifierModel(Base):
    """A trained classifier-stage model, stored as JSON (never pickle); one is active."""

    __tablename__ = "classifier_models"

    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    encoder_id: Mapped[str] = mapped_column(String(500))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- audit -----------------------------------------------------------------------------------


class AuditEvent(Base):
    """One append-only audit event in a SHA-256 hash chain (see ``moderation.audit.log``)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str | None] = mapped_column(String(500))
    origin: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(32), default="success")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditCheckpoint(Base):
    """A signed (sequence, head hash) pair: detects truncation of the event table's tail."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    head_hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(200))  # Ed25519, hex
    public_key: Mapped[str] = mapped_column(String(100))  # Ed25519 public key, hex
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- people and clients --------------------------------------------------------------------


class User(Base):
    """A console user: admin, reviewer, auditor or dpo."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(200))
    totp_secret: Mapped[bytes | None] = mapped_column(LargeBinary)  # encrypted
    totp_last_counter: Mapped[int | None] = mapped_column(BigInteger)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A reviewer scoped to one API client sees and claims only that client's review items.
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_clients.id", ondelete="SET NULL"), index=True
    )


class ApiClient(Base):
    """A platform calling the upload hook: bearer token (hashed) and callback allowlist."""

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    callback_secret: Mapped[bytes] = mapped_column(LargeBinary)  # encrypted
    callback_allowlist: Mapped[list[Any]] = mapped_column(JSON, default=list)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()  # revocation is final
    token_rotated_at: Mapped[datetime | None] = mapped_column()
    secret_rotated_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()  # to the minute (api_clients)
    # The client's policy, ``policies/<name>.yaml`` (None: the deployment's active policy).
    policy: Mapped[str | None] = mapped_column(String(100))


class Subject(Base):
    """A data subject's pseudonymisation secret; erasure destroys the row."""

    __tablename__ = "subjects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Keyed hash of the raw subject id used to find this row (never the raw id).
    lookup: Mapped[str] = mapped_column(String(64), unique=True)
    ref: Mapped[str] = mapped_column(String(64), unique=True)  # the pseudonym stored elsewhere
    secret: Mapped[bytes | None] = mapped_column(LargeBinary)  # encrypted
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeploymentSecret(Base):
    """A deployment-wide secret (e.g. the subject lookup key), wrapped by a master key."""

    __tablename__ = "deployment_secrets"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackAttempt(Base):
    """One delivery attempt of a signed callback to a platform."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    delivery_id: Mapped[str | None] = mapped_column(
        ForeignKey("callback_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackDelivery(Base):
    """One decision to deliver to a client's callback URL (issue 3); retried until delivered.

    ``payload`` is the exact JSON sent (the decision at the time it was made); a later decision
    (a review) is a new delivery. ``state``: pending | delivered | failed.
    """

    __tablename__ = "callback_deliveries"
    __table_args__ = (Index("ix_callback_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id", ondelete="SET NULL"))
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class WorkerHeartbeat(Base):
    """What one worker process has loaded, refreshed every few seconds (readiness, issue 3)."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # hostname:pid
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    encoder_id: Mapped[str | None] = mapped_column(String(500))
    snapshot_version: Mapped[int | None] = mapped_column(Integer)
    snapshot_loaded_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(String(1000))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ErasureRequest(Base):
    """A GDPR Art. 17 request, tracked to its deadline; resumable by its id."""

    __tablename__ = "erasure_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    subject_ref: Mapped[str] = mapped_column(String(64), index=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|running|done
    receipt: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Keyed lookup hash of the subject id while the request is open, so a rerun finds it after
    # the subject row is gone; cleared (with subject_ref and plan) when the request is done.
    lookup: Mapped[str | None] = mapped_column(String(64), index=True)
    # Work list of an open request (upload ids, blob paths, Redis keys, entry ids, counts), so
    # an interrupted erasure resumes and its receipt counts every item exactly once.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
