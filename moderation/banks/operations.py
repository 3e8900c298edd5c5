"""Bank operations as whole units of work: metadata change + snapshot version + audit event.

Each function runs one transaction; the snapshot file is written inside it and older
snapshots are pruned only after the commit. Used by the CLI, the Celery tasks and the console.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.hash_entries import HashEntries
from moderation.banks.importer import ImportHooks, ImportReport, RegionEmbedder, import_into_bank
from moderation.banks.originals import OriginalsVault, shred_originals, vault_dir
from moderation.banks.records import BlocklistError, get_bank, parse_entry_id
from moderation.banks.retention import prune_snapshots
from moderation.banks.sealed_fields import entry_fields
from moderation.banks.snapshot_payload import EntrySignals
from moderation.banks.versions import commit_signals, sync_kept_chains
from moderation.storage.db import transaction
from moderation.storage.models import Bank, Entry

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

SnapshotChange = Callable[[Session], tuple[Sequence[EntrySignals] | HashEntries, Iterable[int]]]
"""A unit of work on banks/entries: returns (the added entries' signals: image entries'
:class:`EntrySignals`, or hash-list entries as :class:`HashEntries`; ids of removed ones)."""


def _commit_with_snapshot(
    runtime: Runtime, change: SnapshotChange, *, follow_encoder: bool = True
) -> int:
    """Run ``change`` and write the next snapshot in one transaction; return its version.

    ``follow_encoder``: first follow a promotion or rollback (the process's encoder becomes the
    serving one); pass False when ``change`` returns signals embedded before this call, so that
    a promotion in between is refused (``EncoderMismatchError``) instead of mixing encoders.
    """
    if follow_encoder:
        runtime.follow_serving_encoder()
    written_paths: list[Path] = []
    try:
        with transaction(runtime.sessions) as session:
            added, removed = change(session)
            removed = list(removed)
            shred_originals(
                session, removed, directory=vault_dir(runtime.settings.resolved_data_dir)
            )
            row, written = commit_signals(
                session,
                keyring=runtime.keyring,
                snapshots_dir=runtime.settings.snapshots_dir,
                encoder_id=str(runtime.encoder.id),
                dim=runtime.encoder.dim,
                added=[] if isinstance(added, HashEntries) else added,
                removed=removed,
                added_hashes=added if isinstance(added, HashEntries) else None,
            )
            written_paths.append(written.path)
            written_paths += sync_kept_chains(
                session,
                keyring=runtime.keyring,
                snapshots_dir=runtime.settings.snapshots_dir,
                added=[] if isinstance(added, HashEntries) else added,
                removed=removed,
                added_hashes=added if isinstance(added, HashEntries) else None,
            )
            version = row.version
    except BaseException:
        for path in written_paths:
            path.unlink(missing_ok=True)
        raise
    with transaction(runtime.sessions) as session:
        prune_snapshots(session, runtime.settings.snapshots_dir)
    runtime.notify_change("snapshot")  # the canary measures the new version
    return version


def originals_vault(runtime: Runtime) -> OriginalsVault:
    """The originals vault of ``runtime``'s data directory."""
    return OriginalsVault(runtime.keyring, vault_dir(runtime.settings.resolved_data_dir))


def commit_with_snapshot(
    runtime: Runtime, change: SnapshotChange, *, follow_encoder: bool = True
) -> int:
    """Run ``change`` and write the next snapshot version in one transaction; return the version.

    For units of work outside this module (a review decision that adds the upload to a bank, a
    two-person-approved deletion): ``change`` makes its metadata changes and audit event in the
    session it is given; the snapshot reflecting them is written before the commit and the
    older snapshots are pruned after it. ``follow_encoder``: as :func:`_commit_with_snapshot`
    (False when ``change`` returns signals embedded before the call).

    Raises:
        moderation.banks.versions.EncoderMismatchError, SnapshotError: as
            :func:`moderation.banks.versions.commit_signals`; anything ``change`` raises
            (the transaction rolls back and the new snapshot file is deleted).
    """
    return _commit_with_snapshot(runtime, change, follow_encoder=follow_encoder)


def import_bank(
    runtime: Runtime,
    bank_name: str,
    paths: Sequence[Path],
    *,
    actor: str,
    progress: Callable[[int, int], None] | None = None,
    region_embedder: RegionEmbedder | None = None,
) -> ImportReport:
    """Import images into a bank and publish a new snapshot version.

    Raises:
        BlocklistError: unknown bank.
        moderation.banks.snapshot.SnapshotError: the current snapshot is unreadable.
    """
    holder: dict[str, ImportReport] = {}
    runtime.follow_serving_encoder()  # before the hooks, which embed entry windows with it
    hooks = ImportHooks(region_embedder=region_embedder)
    if region_embedder is None:
        hooks = runtime.import_hooks()

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        report, signals = import_into_bank(
            session,
            bank_name,
            paths,
            keyring=runtime.keyring,
            encoder=runtime.encoder,
            limits=runtime.limits,
            batch_size=runtime.settings.batch_size,
            added_by=actor,
            region_embedder=hooks.region_embedder,
            on_images=hooks.on_images,
            progress=progress,
            vault=originals_vault(runtime),
        )
        holder["report"] = report
        record_bank_import(
            session,
            actor=actor,
            bank_name=bank_name,
            added=len(report.added),
            skipped=len(report.skipped),
            sources=[p.name for p in paths],
        )
        return signals, ()

    version = _commit_with_snapshot(runtime, change)
    report = holder["report"]
    report.snapshot_version = version
    if hooks.after_commit is not None:
        report.training_pairs = hooks.after_commit(report.entry_of, actor)
    return report


def record_bank_import(
    session: Session,
    *,
    actor: str,
    bank_name: str,
    added: int,
    skipped: int,
    sources: list[str],
    job_id: str | None = None,
) -> None:
    """Audit a bank import (``bank.import``): counts of added and skipped images, how many
    sources were given and, for a console import, the job id. The source names are not
    recorded: a file name of a banned image would stay readable in the append-only log."""
    job = {"job_id": job_id} if job_id is not None else {}
    record_event(
        session,
        actor=actor,
        action="bank.import",
        target=f"bank:{get_bank(session, bank_name).id}",
        details={"added": added, "skipped": skipped, **job, "sources": len(sources)},
    )


def set_entry_disabled(
    runtime: Runtime, entry_id: str, *, disabled: bool, actor: str
) -> dict[str, Any]:
    """Disable or re-enable an entry and publish a new snapshot version.

    Raises:
        BlocklistError: no such entry.
    """
    eid = parse_entry_id(entry_id)

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        entry = session.get(Entry, eid)
        if entry is None:
            raise BlocklistError(f"no entry e_{eid}")
        entry.disabled = disabled
        record_event(
            session,
            actor=actor,
            action="entry.disable" if disabled else "entry.enable",
            target=f"entry:e_{eid}",
            details={"bank_id": entry.bank_id},
        )
        return (), ()

    version = _commit_with_snapshot(runtime, change)
    return {"entry_id": f"e_{eid}", "disabled": disabled, "snapshot_version": version}


def delete_entries(runtime: Runtime, entry_ids: Iterable[int], *, actor: str) -> int:
    """Delete entries (rows and signals) and publish a new snapshot; returns the version."""
    ids = sorted(set(entry_ids))

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        for eid in ids:
            entry = session.get(Entry, eid)
            if entry is not None:
                session.delete(entry)
        record_event(
            session,
            actor=actor,
            action="entry.delete",
            target=",".join(f"entry:e_{e}" for e in ids[:50]),
            details={"count": len(ids)},
        )
        return (), ids

    return _commit_with_snapshot(runtime, change)


def set_bank_enabled(runtime: Runtime, bank_name: str, *, enabled: bool, actor: str) -> int:
    """Enable or disable a whole bank and publish a new snapshot; returns the version."""

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        bank = get_bank(session, bank_name)
        bank.enabled = enabled
        record_event(
            session,
            actor=actor,
            action="bank.enable" if enabled else "bank.disable",
            target=f"bank:{bank.id}",
        )
        return (), ()

    return _commit_with_snapshot(runtime, change)


def rename_bank(
    runtime: Runtime, bank_name: str, new_name: str, *, actor: str, origin: str | None = None
) -> int:
    """Rename a bank (audited ``bank.rename``, old and new name) and publish a new snapshot, so
    workers report matches under the new name; returns the version.

    Policies name banks (``banks:`` patterns): check them before renaming.

    Raises:
        BlocklistError: no such bank, empty new name, or the new name is taken.
    """
    name = new_name.strip()
    if not name:
        raise BlocklistError("bank name must not be empty")

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        bank = get_bank(session, bank_name)
        if session.scalar(select(Bank.id).where(Bank.name == name, Bank.id != bank.id)):
            raise BlocklistError(f"bank {name!r} already exists")
        bank.name = name
        record_event(
            session,
            actor=actor,
            action="bank.rename",
            target=f"bank:{bank.id}",
            origin=origin,
            details={"from": bank_name, "to": name},
        )
        return (), ()

    return _commit_with_snapshot(runtime, change)


def list_banks(runtime: Runtime) -> list[dict[str, Any]]:
    """Every bank with entry counts."""
    with runtime.sessions() as session:
        counts = dict(
            session.execute(select(Entry.bank_id, func.count()).group_by(Entry.bank_id)).all()
        )
        disabled = dict(
            session.execute(
                select(Entry.bank_id, func.count())
                .where(Entry.disabled.is_(True))
                .group_by(Entry.bank_id)
            ).all()
        )
        return [
            {
                "bank_id": b.id,
                "name": b.name,
                "kind": b.kind,
                "category": b.category,
                "enabled": b.enabled,
                "entries": counts.get(b.id, 0),
                "disabled_entries": disabled.get(b.id, 0),
                "created_at": b.created_at.isoformat(),
            }
            for b in session.scalars(select(Bank).order_by(Bank.name))
        ]


def list_entries(runtime: Runtime, bank_name: str) -> list[dict[str, Any]]:
    """The entries of one bank as contract objects (metadata only).

    Raises:
        BlocklistError: unknown bank.
    """
    with runtime.sessions() as session:
        bank = get_bank(session, bank_name)
        entries = session.scalars(
            select(Entry).where(Entry.bank_id == bank.id).order_by(Entry.id)
        ).all()
        fields = entry_fields(session, runtime.keyring, [e.id for e in entries])
        return [
            {
                "entry_id": e.public_id,
                "bank": bank.name,
                "label": fields[e.id].label,
                "source_ref": fields[e.id].source_ref,
                "added_at": e.added_at.isoformat(),
                "disabled": e.disabled,
            }
            for e in entries
        ]
