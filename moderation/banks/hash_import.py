"""Hash-list banks: import the hash lists the industry exchanges into a bank.

Import (:func:`import_hash_list`): the list is parsed whole first
(:func:`moderation.banks.hashlists.parse_hash_list`); one malformed line and nothing is imported
(:class:`HashListError` lists every line and reason). Otherwise every record becomes one entry
(``origin="hash_list"``) in one transaction that also writes the next snapshot version and one audit
event. A record whose signals are all already in the bank (or repeated in the file) is merged, not
added. PDQ digests go into the snapshot as they are, and so do the frames of vPDQ video signatures
(digest, quality, timestamp: :mod:`moderation.banks.import_signals`); exact hashes (MD5, SHA-1,
SHA-256) only keyed, plus sealed for export (:mod:`moderation.banks.hash_entries`), so neither the
database nor the data directory ever holds a plaintext list. Entries are inserted in bulk (ids
reserved up front, one executemany of every row), so a million-line list imports in seconds.
:func:`add_signals` is the same path for signals given one by one (the HMA API). The export side is
:mod:`moderation.banks.hash_export`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from sqlalchemy import Table, func, select, text
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.hash_entries import ExactSealer, HashEntries
from moderation.banks.hashlists import gc_paused, parse_hash_list
from moderation.banks.hashlists.records import (
    LIST_SIGNAL_TYPES,
    HashRecord,
    LineProblem,
    ListSource,
    check_value,
    vpdq_unusable,
)
from moderation.banks.hashlists.te import TE_SIGNAL_TYPES
from moderation.banks.import_signals import NewEntries, bank_signals, needs_sealer, new_signals
from moderation.banks.operations import commit_with_snapshot
from moderation.banks.records import BlocklistError, get_bank
from moderation.banks.sealed_fields import BankSealer
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import current_snapshot, read_payload
from moderation.crypto.deployment import deployment_secret
from moderation.signals.exact import (
    EXACT_EXPORT_KEY_NAME,
    EXACT_KEY_NAME,
)
from moderation.storage.models import Entry

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

#: Malformed lines quoted in a :class:`HashListError` message (all are in ``errors``).
ERRORS_SHOWN = 20


class HashListError(BlocklistError):
    """A hash list has malformed lines: nothing was imported. ``errors`` holds every one."""

    def __init__(self, name: str, errors: Sequence[LineProblem]) -> None:
        self.errors = list(errors)
        shown = "; ".join(f"line {e.line}: {e.reason}" for e in self.errors[:ERRORS_SHOWN])
        more = len(self.errors) - ERRORS_SHOWN
        tail = f"; and {more} more" if more > 0 else ""
        super().__init__(
            f"{name}: {len(self.errors)} malformed line(s), nothing imported: {shown}{tail}"
        )


@dataclass
class HashImportReport:
    """What :func:`import_hash_list` did; ``skipped`` lines were well-formed but refused."""

    bank: str
    format: str
    records: int
    added: int = 0
    merged: int = 0
    skipped: list[LineProblem] = field(default_factory=list)
    snapshot_version: int | None = None
    #: Per record, the entry carrying its signals (added, or already in the bank).
    entry_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The CLI's and the console's view of the report."""
        return {
            "bank": self.bank,
            "format": self.format,
            "records": self.records,
            "added": self.added,
            "merged": self.merged,
            "skipped": [{"line": s.line, "reason": s.reason} for s in self.skipped],
            "snapshot_version": self.snapshot_version,
        }


def _bank_entry_ids(session: Session, bank_id: int) -> npt.NDArray[np.int64]:
    return np.fromiter(
        session.scalars(select(Entry.id).where(Entry.bank_id == bank_id)), dtype=np.int64
    )


def current_payload(session: Session, runtime: Runtime) -> Payload | None:
    """The current snapshot's payload, decrypted, for its PDQ digests, exact hashes and masks
    (a delta version's without embeddings: ``read_payload(embeddings=False)``); None before
    the first snapshot.

    Raises:
        moderation.banks.snapshot.SnapshotError: the current snapshot is unreadable.
    """
    row = current_snapshot(session)
    if row is None:
        return None
    return read_payload(
        session, runtime.keyring, runtime.settings.snapshots_dir, row, embeddings=False
    )


def _reserve_entry_ids(session: Session, count: int) -> list[int]:
    """``count`` fresh entry ids. PostgreSQL: drawn from the column's sequence in one query, so
    concurrent writers never collide; SQLite: after the largest id, safe because SQLite admits
    one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        ids = session.scalars(
            text(
                "SELECT nextval(pg_get_serial_sequence('entries', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
        return [int(i) for i in ids]
    start = (session.scalar(select(func.max(Entry.id))) or 0) + 1
    return list(range(start, start + count))


def _bound(column: Any, dialect: Any, value: Any) -> Any:
    """``value`` as SQLAlchemy would bind it for ``column`` (SQLite stores datetimes as text)."""
    process = column.type.bind_processor(dialect)
    return value if process is None else process(value)


def _insert_entries(
    session: Session,
    sealer: BankSealer,
    records: Sequence[HashRecord],
    default_label: str,
    actor: str,
) -> list[int]:
    """Insert one entry per record (one executemany with ids reserved up front: RETURNING
    would send SQLite one statement per row), labels and refs sealed by ``sealer``; their ids,
    in record order."""
    if not records:
        return []
    ids = _reserve_entry_ids(session, len(records))
    connection = session.connection()
    dialect = connection.dialect
    table = cast(Table, Entry.__table__)
    now, enabled = (
        _bound(table.c.added_at, dialect, datetime.now(UTC)),
        _bound(table.c.disabled, dialect, False),
    )
    origin = "hash_list"
    seal, bank_id = sealer.seal, sealer.bank_id
    rows = [
        (
            eid,
            bank_id,
            seal(eid, "label", (r.label or default_label)[:500]),
            seal(eid, "source_ref", r.ref[:1000]),
            actor,
            now,
            enabled,
            origin,
        )
        for eid, r in zip(ids, records, strict=True)
    ]
    # The driver's own executemany: SQLAlchemy's per-row parameter processing (even for a Core
    # insert) cost more than SQLite's work at a million rows.
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    columns = "id, bank_id, label_sealed, source_ref_sealed, added_by, added_at, disabled, origin"
    connection.exec_driver_sql(
        f"INSERT INTO entries ({columns}) VALUES ({', '.join([mark] * 8)})",  # noqa: S608
        rows,
    )
    return ids


def import_hash_list(
    runtime: Runtime,
    bank_name: str,
    source: ListSource | Path,
    *,
    fmt: str = "auto",
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> HashImportReport:
    """Import a hash list into bank ``bank_name`` as one new snapshot version.

    Args:
        source: the file at a path (streamed), or a
            :class:`~moderation.banks.hashlists.records.ListSource`: a file, or the list's bytes
            in memory (parsed there, never written). Its name makes the entries' refs
            (``name:line``) and the audited ``source``; its stem labels records that have none.
        fmt: one of :data:`moderation.banks.hashlists.FORMATS` (``auto`` detects).
        progress: called with the number of lines read so far while parsing.

    Raises:
        HashListError: malformed lines (nothing imported; every line and reason listed).
        ValueError: unknown format, or one ``auto`` cannot decide (the message says which).
        BlocklistError: unknown bank.
        moderation.banks.snapshot.SnapshotError: the current snapshot is unreadable.
    """
    source = ListSource.of(source)
    parsed = parse_hash_list(source, fmt, progress=progress)
    if parsed.errors:
        raise HashListError(source.name, parsed.errors)
    with gc_paused():  # a million records and their signals: nothing for the collector to free
        return add_signals(
            runtime,
            bank_name,
            parsed.records,
            actor=actor,
            source=source.name,
            label=source.stem,
            fmt=parsed.format,
            skipped=parsed.skipped,
            duplicates=parsed.duplicates,
        )


def signal_record(signals: Mapping[str, str], *, ref: str, label: str = "") -> HashRecord:
    """One record of signals given by name (``{"pdq": "<64 hex>", "md5": ...}``, ``"vpdq"``: a
    ``VPDQSignal`` string; ThreatExchange names such as ``video_md5`` are accepted,
    :data:`moderation.banks.hashlists.TE_SIGNAL_TYPES`), validated and canonicalised for
    :func:`add_signals`.

    Raises:
        ValueError: no signals, an unsupported signal type, a value of the wrong length or not
            hexadecimal, a malformed vPDQ signal or one without a usable frame, or two values
            for one signal type (the message says which).
    """
    if not signals:
        raise ValueError("no signals given")
    canonical: dict[str, str] = {}
    for name, value in signals.items():
        kind = TE_SIGNAL_TYPES.get(name)
        if kind is None:
            supported = ", ".join(LIST_SIGNAL_TYPES)
            raise ValueError(f"no such signal type {name!r}; supported: {supported}")
        if not isinstance(value, str):
            raise ValueError(f"the {name} value must be a string")
        if kind in canonical:
            raise ValueError(f"two values for signal type {kind}")
        canonical[kind] = check_value(kind, value)
        unusable = vpdq_unusable(canonical[kind]) if kind == "vpdq" else None
        if unusable is not None:
            raise ValueError(unusable)
    return HashRecord(line=1, signals=canonical, pdq_quality=None, label=label, ref=ref)


def _split_new(
    session: Session, runtime: Runtime, bank_id: int, records: Sequence[HashRecord]
) -> tuple[NewEntries, list[int]]:
    """The records that bring a signal the bank lacks (with their signals), and every record's
    owner (:class:`~moderation.banks.import_signals.BankSignals`: ``-(k + 1)`` is the k-th
    kept record)."""
    sealer = None
    if needs_sealer(records):
        sealer = ExactSealer(
            deployment_secret(session, runtime.keyring, EXACT_KEY_NAME),
            deployment_secret(session, runtime.keyring, EXACT_EXPORT_KEY_NAME),
        )
    present = bank_signals(current_payload(session, runtime), _bank_entry_ids(session, bank_id))
    new = NewEntries()
    owners: list[int] = []
    for record in records:
        pending = -(len(new.records) + 1)
        signals = new_signals(record, present, sealer, pending)
        if isinstance(signals, int):
            owners.append(signals)
            continue
        owners.append(pending)
        new.add(record, signals)
    return new, owners


def _audit_import(
    session: Session, report: HashImportReport, *, actor: str, bank_id: int, source: str
) -> None:
    record_event(
        session,
        actor=actor,
        action="bank.import_hashes",
        target=f"bank:{bank_id}",
        details={
            "source": source,
            "format": report.format,
            "records": report.records,
            "added": report.added,
            "merged": report.merged,
            "skipped": len(report.skipped),
        },
    )


def add_signals(
    runtime: Runtime,
    bank_name: str,
    records: Sequence[HashRecord],
    *,
    actor: str,
    source: str,
    label: str,
    fmt: str = "signals",
    skipped: Sequence[LineProblem] = (),
    duplicates: int = 0,
) -> HashImportReport:
    """Add ``records`` (canonical, validated signals: :func:`signal_record` or
    :func:`moderation.banks.hashlists.parse_hash_list`) to bank ``bank_name`` as hash-list
    entries, in one transaction with the next snapshot version and one ``bank.import_hashes``
    audit event by ``actor``. A record whose signals are all in the bank already is merged.

    Args:
        source: where the records came from, for the audit event and log (a file name).
        label: the label of records that have none.
        fmt: the format name reported and audited.
        skipped, duplicates: what the parser refused or merged before, reported and audited.

    Returns:
        the report; ``entry_ids`` holds, per record, the entry that now carries its signals
        (new, or the one already holding them).

    Raises:
        moderation.banks.records.UnknownBankError: unknown bank (a :class:`BlocklistError`).
        moderation.banks.snapshot.SnapshotError: the current snapshot is unreadable.
    """
    report = HashImportReport(
        bank=bank_name, format=fmt, records=len(records), skipped=list(skipped)
    )

    def change(session: Session) -> tuple[HashEntries, Iterable[int]]:
        bank = get_bank(session, bank_name)
        new, owners = _split_new(session, runtime, bank.id, records)
        report.merged = len(records) - len(new.records) + duplicates
        sealer = BankSealer(session, runtime.keyring, bank.id)
        ids = _insert_entries(session, sealer, new.records, label, actor)
        report.added = len(ids)
        report.entry_ids = [ids[-owner - 1] if owner < 0 else owner for owner in owners]
        _audit_import(session, report, actor=actor, bank_id=bank.id, source=source)
        return new.entries(ids), ()

    report.snapshot_version = commit_with_snapshot(runtime, change)
    logger.info(
        "hash list %s into %s: %d added, %d merged, %d skipped",
        source,
        bank_name,
        report.added,
        report.merged,
        len(report.skipped),
    )
    return report
