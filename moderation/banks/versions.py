"""Snapshot versions: committing entries' signals as the next encrypted snapshot version,
reading the current one, and pruning older ones.

Every change to what is searchable (import, disable, enable, delete, erasure, bank on/off)
writes a new snapshot version in the same transaction as the metadata change; workers notice
the version and reload (:func:`moderation.banks.blocklist.load_blocklist`). The payload
format is described in :mod:`moderation.banks.snapshot_payload`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from moderation.banks.hash_entries import HashEntries
from moderation.banks.index import HNSW_MIN_ENTRIES, CosineIndex
from moderation.banks.records import BlocklistError
from moderation.banks.snapshot import (
    SnapshotError,
    SnapshotFile,
    read_snapshot,
    write_snapshot,
)
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Bank, Entry, IndexSnapshot

logger = logging.getLogger(__name__)

#: Active entries from which a snapshot carries its built cosine index (the size at which
#: ``CosineIndex.build`` switches from exact search to HNSW).
STORED_INDEX_MIN_ENTRIES = HNSW_MIN_ENTRIES

# Arbitrary constant naming the PostgreSQL advisory lock that serialises snapshot writers.
_SNAPSHOT_LOCK_KEY = 0x6D6F645F736E6170  # "mod_snap"


class EncoderMismatchError(BlocklistError):
    """The snapshot was built by another encoder: embeddings would not be comparable."""


def current_snapshot(session: Session) -> IndexSnapshot | None:
    """The newest snapshot row, or None before the first bank import."""
    return session.scalar(select(IndexSnapshot).order_by(IndexSnapshot.version.desc()).limit(1))


def _lock_snapshots(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SNAPSHOT_LOCK_KEY})


def read_payload(
    session: Session, keyring: KeyRing, snapshots_dir: Path, row: IndexSnapshot
) -> Payload:
    """Decrypt and parse the payload of snapshot ``row`` (in memory only).

    Raises:
        SnapshotError: missing file, tampering, wrong key, substituted snapshot.
    """
    path = Path(row.path)
    if not path.is_absolute():
        path = snapshots_dir / path
    plaintext = read_snapshot(
        path,
        keyring,
        expected_snapshot_id=row.snapshot_id,
        expected_version=row.version,
        expected_encoder_id=row.encoder_id,
        expected_sha256=row.sha256,
    )
    try:
        return Payload.from_bytes(plaintext)
    except (ValueError, KeyError) as exc:
        raise SnapshotError(
            f"snapshot v{row.version} ({row.snapshot_id}) at {path}: bad payload: {exc}"
        ) from exc


def _entry_state(session: Session) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Every entry id, sorted, and whether it is searchable (entry and its bank enabled)."""
    rows = session.execute(
        select(Entry.id, Entry.disabled, Bank.enabled)
        .join(Bank, Entry.bank_id == Bank.id)
        .order_by(Entry.id)
    ).all()
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    searchable = np.fromiter(((not r[1]) and r[2] for r in rows), np.bool_, len(rows))
    return ids, searchable


def _active_mask(
    ids: npt.NDArray[np.int64],
    searchable: npt.NDArray[np.bool_],
    entry_ids: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """For each of ``entry_ids``: present in the sorted ``ids`` and searchable there."""
    if not len(ids):
        return np.zeros(len(entry_ids), np.bool_)
    at = np.minimum(np.searchsorted(ids, entry_ids), len(ids) - 1)
    mask: npt.NDArray[np.bool_] = (ids[at] == entry_ids) & searchable[at]
    return mask


def commit_signals(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    encoder_id: str,
    dim: int,
    added: Sequence[EntrySignals] = (),
    removed: Iterable[int] = (),
    added_hashes: HashEntries | None = None,
) -> tuple[IndexSnapshot, SnapshotFile]:
    """Write the next snapshot version reflecting the database and the given changes.

    Call inside the transaction that changed entries/banks: the new payload is the current
    one minus ``removed`` and minus entries that no longer exist, plus ``added``, with the
    active mask recomputed from the database. The snapshot row is added to ``session``; the
    file is written before the commit (ciphertext only). After the caller commits, call
    :func:`prune_snapshots`; if the transaction fails, delete the returned file.

    Raises:
        EncoderMismatchError: the current snapshot was built by another encoder.
        SnapshotError: the current snapshot cannot be read (fail closed: no blind rebuild).
    """
    _lock_snapshots(session)
    payload, version = _current_payload(
        session, keyring=keyring, snapshots_dir=snapshots_dir, encoder_id=encoder_id, dim=dim
    )
    payload = _next_payload(
        session, payload, added=added, removed=removed, added_hashes=added_hashes
    )
    snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = write_snapshot(
        snapshots_dir,
        payload.to_bytes(index_holds_active=payload.cosine_index is not None),
        snapshot_id=uuid.uuid4().hex,
        version=version,
        encoder_id=encoder_id,
        keyring=keyring,
    )
    new_row = _add_snapshot_row(session, written, payload)
    logger.info(
        "snapshot v%d written: %d entries (%d active), %d bytes",
        version,
        len(payload.entry_ids) + len(payload.hashes),
        new_row.entry_count,
        written.size_bytes,
    )
    return new_row, written


def _current_payload(
    session: Session, *, keyring: KeyRing, snapshots_dir: Path, encoder_id: str, dim: int
) -> tuple[Payload, int]:
    """The current snapshot's payload (empty before the first) and the next version number.

    Raises:
        EncoderMismatchError: the current snapshot was built by another encoder.
        SnapshotError: the current snapshot cannot be read.
    """
    row = current_snapshot(session)
    if row is None:
        return Payload.empty(encoder_id, dim), 1
    if row.encoder_id != encoder_id:
        raise EncoderMismatchError(
            f"snapshot v{row.version} was built with encoder {row.encoder_id}; this process "
            f"runs {encoder_id}. Embeddings from different encoders are not comparable: "
            "configure the snapshot's encoder (MODERATION_ENCODER) or re-import the banks "
            "into a new data directory."
        )
    return read_payload(session, keyring, snapshots_dir, row), row.version + 1


def _next_payload(
    session: Session,
    payload: Payload,
    *,
    added: Sequence[EntrySignals],
    removed: Iterable[int],
    added_hashes: HashEntries | None = None,
) -> Payload:
    """``payload`` minus ``removed`` and entries gone from the database, plus ``added`` (and
    ``added_hashes``), with the active masks recomputed from the database and the stored index
    rebuilt."""
    ids, searchable = _entry_state(session)
    in_payload = np.concatenate([payload.entry_ids, payload.hashes.entry_ids])
    gone = in_payload[~np.isin(in_payload, ids)].tolist()
    payload = payload.without([*removed, *gone]).with_added(added)
    if added_hashes is not None:
        payload.hashes = payload.hashes.with_added(added_hashes)
    payload.active = _active_mask(ids, searchable, payload.entry_ids)
    payload.hashes.active = _active_mask(ids, searchable, payload.hashes.entry_ids)
    payload.cosine_index = _stored_index(payload)
    return payload


def _add_snapshot_row(session: Session, written: SnapshotFile, payload: Payload) -> IndexSnapshot:
    """Add (and flush) the row recording the snapshot file just written."""
    new_row = IndexSnapshot(
        version=written.version,
        snapshot_id=written.snapshot_id,
        encoder_id=written.encoder_id,
        key_id=written.key_id,
        sha256=written.sha256,
        path=written.path.name,
        entry_count=int(payload.active.sum()) + int(payload.hashes.active.sum()),
        size_bytes=written.size_bytes,
    )
    session.add(new_row)
    session.flush()
    return new_row


def prune_snapshots(session: Session, snapshots_dir: Path) -> list[Path]:
    """Delete every snapshot file and row older than the current version.

    Old snapshots hold signals of erased or deleted entries, so they are not kept around.
    Returns the deleted paths.
    """
    row = current_snapshot(session)
    if row is None:
        return []
    removed: list[Path] = []
    for old in session.scalars(select(IndexSnapshot).where(IndexSnapshot.version < row.version)):
        session.delete(old)
    keep = Path(row.path).name
    for path in snapshots_dir.glob("*.snapshot"):
        if path.name != keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _stored_index(payload: Payload) -> bytes | None:
    """The serialized cosine index of ``payload``'s active entries for a large bank, else None."""
    if int(payload.active.sum()) < STORED_INDEX_MIN_ENTRIES:
        return None
    ids = payload.entry_ids[payload.active]
    return CosineIndex.build(ids, payload.full_vectors()[payload.active]).serialize()
