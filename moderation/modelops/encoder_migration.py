"""Encoder upgrade, blue-green: build a second chain of snapshots embedded with a target encoder
while the serving one keeps deciding (``moderation encoder migrate TARGET``).

:func:`start_migration` records an :class:`~moderation.storage.encoders.EncoderMigration` in
state ``running``; :func:`run_migration` (the ``moderation.encoder_migrate`` Celery task, or
in-process) then builds the target's chain (:mod:`moderation.banks.encoder_chains`):

1. its first snapshot holds every entry of the serving snapshot by PDQ alone (image entries'
   digests, hash-list entries as they are), so the target chain is complete from the start;
2. batch by batch, the originals of banks that retain them (:mod:`moderation.banks.originals`)
   are decrypted, decoded and embedded with the target, outside any transaction; each batch is
   then committed as the next snapshot of the target chain with the migration's progress. What
   is committed is the progress: a run stopped anywhere (worker restart, redelivered task)
   resumes with the entries its chain does not embed yet;
3. when no retained original is left to embed the migration becomes ``ready``.

Entries of banks without originals stay matched by PDQ in the target chain, and by the serving
encoder's embeddings until promotion. Changes to banks meanwhile reach the target chain too
(:func:`moderation.banks.versions.sync_kept_chains`): removals at once, new image entries by PDQ
until the next run embeds their originals. Promotion and rollback:
:mod:`moderation.modelops.encoder_promotion`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.encoder_chains import SHADOW_STATES, latest_migration
from moderation.banks.operations import originals_vault
from moderation.banks.originals import OriginalMissingError
from moderation.banks.records import BlocklistError
from moderation.banks.retention import prune_snapshots
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.banks.versions import (
    current_snapshot,
    lock_snapshots,
    next_payload,
    pdq_only,
    read_payload,
    write_payload,
)
from moderation.crypto.errors import CryptoError
from moderation.media.decode import UnscannableImage, decode_image
from moderation.signals.pdq import pdq_hash
from moderation.storage.db import transaction
from moderation.storage.encoders import EncoderMigration, EntryOriginal
from moderation.storage.models import Entry

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)

#: Originals embedded per committed step of a migration (one snapshot version each).
DEFAULT_STEP = 64


class MigrationError(BlocklistError):
    """The migration cannot start or go on (the message says why)."""


@dataclass(frozen=True)
class MigrationProgress:
    """Where a migration stands after a run: state, retained originals embedded of ``total``,
    image entries without an original, and the embedding throughput so far (entries/s)."""

    migration_id: str
    state: str
    done: int
    total: int
    without_originals: int
    entries_per_second: float | None


def _progress(row: EncoderMigration) -> MigrationProgress:
    rate = row.done / row.embed_seconds if row.embed_seconds and row.done else None
    return MigrationProgress(row.id, row.state, row.done, row.total, row.without_originals, rate)


def start_migration(
    runtime: Runtime, target_name: str, *, actor: str, origin: str | None = None
) -> MigrationProgress:
    """Record a new migration from the serving encoder to ``target_name`` (audited as
    ``encoder.migrate``); the caller then runs :func:`run_migration` (a Celery job).

    Raises:
        MigrationError: a migration is already running or ready, or the target is the serving
            encoder.
        ValueError, FileNotFoundError: ``target_name`` is no loadable encoder.
    """
    source = runtime.encoder
    target = runtime.encoder_named(target_name)
    if str(target.id) == str(source.id):
        raise MigrationError(f"{target_name} is the serving encoder already")
    with transaction(runtime.sessions) as session:
        active = latest_migration(session)
        if active is not None and active.state in SHADOW_STATES:
            raise MigrationError(
                f"migration {active.id} to {active.target_name} is {active.state}: promote it or "
                "wait for it (one migration at a time)"
            )
        row = EncoderMigration(
            source_name=source.name,
            source_id=str(source.id),
            target_name=target_name,
            target_id=str(target.id),
            state="running",
            created_by=actor,
        )
        session.add(row)
        session.flush()
        _count(session, row)
        record_event(
            session,
            actor=actor,
            action="encoder.migrate",
            target=f"encoder_migration:{row.id}",
            origin=origin,
            details={
                "source": source.name,
                "target": target_name,
                "retained_originals": row.total,
                "without_originals": row.without_originals,
            },
        )
        return _progress(row)


def _count(session: Session, row: EncoderMigration) -> None:
    """Refresh ``row.total`` (image entries with a retained original) and
    ``row.without_originals`` (image entries without)."""
    images = session.scalar(select(func.count()).where(Entry.origin == "image")) or 0
    row.total = session.scalar(select(func.count()).select_from(EntryOriginal)) or 0
    row.without_originals = max(0, int(images) - int(row.total))


def _target_payload(runtime: Runtime, session: Session, row: EncoderMigration) -> Payload | None:
    """The newest payload of the target chain, or None before its first snapshot."""
    assert row.target_id is not None
    snapshot = current_snapshot(session, row.target_id)
    if snapshot is None:
        return None
    return read_payload(session, runtime.keyring, runtime.settings.snapshots_dir, snapshot)


def _first_payload(runtime: Runtime, session: Session, target: Encoder) -> Payload:
    """The target chain's first payload: every serving entry, matched by PDQ alone."""
    payload = Payload.empty(str(target.id), target.dim)
    serving = current_snapshot(session)
    if serving is not None:
        source = read_payload(session, runtime.keyring, runtime.settings.snapshots_dir, serving)
        payload.hashes = source.hashes.with_added(pdq_only(source))
    return payload


def _pending(session: Session, payload: Payload | None, limit: int, skipped: set[int]) -> list[int]:
    """Up to ``limit`` entries with a retained original not embedded in ``payload`` yet (and
    not in ``skipped``: originals this run could not embed)."""
    embedded = skipped if payload is None else skipped | set(payload.entry_ids.tolist())
    pending: list[int] = []
    for eid in session.scalars(select(EntryOriginal.entry_id).order_by(EntryOriginal.entry_id)):
        if eid not in embedded:
            pending.append(eid)
            if len(pending) >= limit:
                break
    return pending


def _embed(
    runtime: Runtime, session: Session, target: Encoder, entry_ids: list[int]
) -> list[EntrySignals]:
    """Decrypt, decode and embed these entries' originals with ``target`` (no transaction).
    Originals that vanished (shredded meanwhile) or no longer decode are left out (logged)."""
    vault = originals_vault(runtime)
    ids, images = [], []
    for eid in entry_ids:
        try:
            data = vault.read(session, eid)
            images.append(decode_image(data, runtime.limits).frames[0])
            ids.append(eid)
        except (OriginalMissingError, CryptoError, UnscannableImage) as exc:
            logger.warning("migration: entry e_%d left to PDQ: %s", eid, exc)
    vectors = target.encode(images, batch_size=runtime.settings.batch_size)
    signals = []
    for eid, image, vector in zip(ids, images, vectors, strict=True):
        digest = pdq_hash(image)
        signals.append(EntrySignals(eid, vector, digest.digest, digest.quality))
    return signals


def _load_row(session: Session, migration_id: str) -> EncoderMigration:
    row = session.get(EncoderMigration, migration_id)
    if row is None:
        raise MigrationError(f"no encoder migration {migration_id!r}")
    return row


def _commit_step(
    runtime: Runtime,
    migration_id: str,
    target: Encoder,
    signals: list[EntrySignals] | None,
    seconds: float,
) -> EncoderMigration:
    """Write the next target snapshot (the first one when ``signals`` is None) and the
    migration's progress in one transaction; prune after the commit."""
    written = None
    try:
        with transaction(runtime.sessions) as session:
            lock_snapshots(session)
            row = _load_row(session, migration_id)
            payload = _target_payload(runtime, session, row)
            if payload is None or signals is None:
                payload = payload or _first_payload(runtime, session, target)
                signals = signals or []
            ids = [s.entry_id for s in signals]
            payload = next_payload(session, payload, added=signals, removed=ids)
            written = write_payload(
                session, runtime.keyring, runtime.settings.snapshots_dir, payload
            )[1]
            _count(session, row)
            row.done = min(row.total, int(payload.entry_ids.size))
            row.embed_seconds = (row.embed_seconds or 0.0) + seconds
            row.updated_at = datetime.now(UTC)
            session.flush()
            session.expunge(row)
    except BaseException:
        if written is not None:
            written.path.unlink(missing_ok=True)
        raise
    with transaction(runtime.sessions) as session:
        prune_snapshots(session, runtime.settings.snapshots_dir)
    return row


def _finish(runtime: Runtime, migration_id: str, *, actor: str) -> EncoderMigration:
    """Mark the migration ``ready`` (audited as ``encoder.migration_ready``)."""
    with transaction(runtime.sessions) as session:
        row = _load_row(session, migration_id)
        if row.state == "running":
            row.state = "ready"
            row.updated_at = datetime.now(UTC)
            record_event(
                session,
                actor=actor,
                action="encoder.migration_ready",
                target=f"encoder_migration:{row.id}",
                details={"done": row.done, "without_originals": row.without_originals},
            )
        session.flush()
        session.expunge(row)
        return row


def run_migration(
    runtime: Runtime,
    migration_id: str,
    *,
    step: int = DEFAULT_STEP,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    actor: str = "encoder_migration",
    progress: Callable[[MigrationProgress], None] | None = None,
) -> MigrationProgress:
    """Build (or go on building) the target chain of migration ``migration_id``; idempotent
    and resumable (see the module docstring). Returns where it stands; with ``max_steps`` it
    stops after that many committed steps, with ``max_seconds`` after the step that passes that
    budget (``running`` still, when originals are left: the next run goes on).
    Also embeds originals added since a migration became ``ready`` (or ``promoted``).

    Raises:
        MigrationError: unknown migration, or one cancelled or failed.
        moderation.banks.snapshot.SnapshotError: a snapshot cannot be read.
    """
    with runtime.sessions() as session:
        row = _load_row(session, migration_id)
        if row.state in ("cancelled", "failed"):
            raise MigrationError(f"migration {migration_id} is {row.state}")
        target = runtime.encoder_named(row.target_name)
        first = _target_payload(runtime, session, row) is None
    if first:
        row = _commit_step(runtime, migration_id, target, None, 0.0)
    steps, skipped = 0, set[int]()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while (max_steps is None or steps < max_steps) and (
        deadline is None or time.monotonic() < deadline
    ):
        with runtime.sessions() as session:
            pending = _pending(session, _target_payload(runtime, session, row), step, skipped)
            started = time.perf_counter()
            signals = _embed(runtime, session, target, pending) if pending else []
        skipped.update(set(pending) - {s.entry_id for s in signals})
        if not pending:
            row = _finish(runtime, migration_id, actor=actor)
            break
        row = _commit_step(runtime, migration_id, target, signals, time.perf_counter() - started)
        steps += 1
        logger.info("migration %s: %d/%d originals embedded", row.id, row.done, row.total)
        if progress is not None:
            progress(_progress(row))
    return _progress(row)


def resume_migration(runtime: Runtime, *, max_seconds: float) -> MigrationProgress | None:
    """Go on with the newest migration while it is ``running`` (the Celery beat job), for at
    most about ``max_seconds``; None when there is none to run or another run holds its lock.

    With Redis configured, one run at a time holds ``moderation:encoder-migration:<id>`` (it
    expires, so a run killed with its worker is resumed by the next beat); without Redis,
    concurrent runs only repeat work (each step re-reads what is embedded under the snapshot
    lock).
    """
    with runtime.sessions() as session:
        row = latest_migration(session)
        if row is None or row.state != "running":
            return None
        migration_id = row.id
    url = runtime.settings.effective_redis_url
    if not url:
        return run_migration(runtime, migration_id, max_seconds=max_seconds)
    import redis

    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
    lock = client.lock(f"moderation:encoder-migration:{migration_id}", timeout=max_seconds * 2 + 60)
    if not lock.acquire(blocking=False):
        return None
    try:
        return run_migration(runtime, migration_id, max_seconds=max_seconds)
    finally:
        lock.release()
