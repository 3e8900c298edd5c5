"""Delta versions in the database: writing one, following a version's chain back to the full
version it builds on, and reading each delta with its order checked.

Columns of ``index_snapshots`` for deltas: ``base_version``, the version a delta applies on top
of (the previous one of its chain; NULL for a full version); ``changed_entries``, a delta's added
plus removed entries (what compaction counts); ``compacted_from``, for a full version written by
compaction, the version whose content it holds (workers at that version only bump theirs; the
highest version is current, as before). The delta's authenticated payload names the same base
version (:mod:`moderation.banks.snapshot_delta`). A delta whose file is missing or altered, or
whose base is not the version before it, is refused with :class:`SnapshotError`; readers then
fail closed like for a full snapshot.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.snapshot import SnapshotError, SnapshotFile, read_snapshot, write_snapshot
from moderation.banks.snapshot_delta import DeltaPayload
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Bank, Entry, IndexSnapshot

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Deltas after a full version past which a change writes a full version itself, so a chain
#: stays short even when the compaction job (:mod:`moderation.banks.compaction`) is not running.
MAX_CHAIN_DELTAS: Final = 32

# Ids per IN (...) query: below SQLite's 32,766 bound parameters.
_ID_CHUNK = 10_000


def snapshot_path(snapshots_dir: Path, row: IndexSnapshot) -> Path:
    """The file of snapshot ``row`` (its recorded name, inside ``snapshots_dir``)."""
    path = Path(row.path)
    return path if path.is_absolute() else snapshots_dir / path


def chain_of(session: Session, row: IndexSnapshot) -> list[IndexSnapshot]:
    """The rows from the full version ``row`` builds on up to ``row``, oldest first (just
    ``[row]`` for a full version).

    Raises:
        SnapshotError: a delta's base version is gone, is not older, or is another encoder's.
    """
    chain = [row]
    while (base_version := chain[-1].base_version) is not None:
        base = session.get(IndexSnapshot, base_version)
        newer = chain[-1]
        if base is None:
            raise SnapshotError(
                f"delta snapshot v{newer.version} applies on top of v{base_version}, which is "
                "gone: the chain is broken",
                version=newer.version,
            )
        if base.version >= newer.version or base.encoder_id != newer.encoder_id:
            raise SnapshotError(
                f"delta snapshot v{newer.version} claims base v{base.version} (not older, or "
                "another encoder's): out of order, refused",
                version=newer.version,
            )
        chain.append(base)
    chain.reverse()
    return chain


def read_version(
    keyring: KeyRing, snapshots_dir: Path, row: IndexSnapshot, parse: Callable[[memoryview], T]
) -> T:
    """Verify and decrypt the file of snapshot ``row`` (against the id, version, encoder and
    SHA-256 its row records) and parse the plaintext with ``parse``.

    Raises:
        SnapshotError: missing file, tampering, wrong key, substituted snapshot, or ``parse``
            raised ValueError or KeyError (a bad payload).
    """
    path = snapshot_path(snapshots_dir, row)
    plaintext = read_snapshot(
        path,
        keyring,
        expected_snapshot_id=row.snapshot_id,
        expected_version=row.version,
        expected_encoder_id=row.encoder_id,
        expected_sha256=row.sha256,
    )
    try:
        return parse(plaintext)
    except (ValueError, KeyError) as exc:
        raise SnapshotError(
            f"snapshot v{row.version} ({row.snapshot_id}) at {path}: bad payload: {exc}",
            path=path,
            version=row.version,
        ) from exc


def read_delta(
    keyring: KeyRing, snapshots_dir: Path, row: IndexSnapshot, *, base_version: int
) -> DeltaPayload:
    """Verify, decrypt and parse delta ``row``, which must apply on top of ``base_version``.

    Raises:
        SnapshotError: missing file, tampering (SHA-256, AES-GCM), wrong key, not a delta, or
            a delta whose authenticated base is not ``base_version`` (out of order).
    """
    delta = read_version(keyring, snapshots_dir, row, DeltaPayload.from_bytes)
    path = snapshot_path(snapshots_dir, row)
    if delta.base_version != base_version or row.base_version != base_version:
        raise SnapshotError(
            f"delta snapshot v{row.version} at {path} applies on top of "
            f"v{delta.base_version}, not v{base_version}: out of order, refused",
            path=path,
            version=row.version,
        )
    if delta.segment.encoder_id != row.encoder_id:
        raise SnapshotError(f"delta snapshot v{row.version} holds another encoder's vectors")
    return delta


def read_deltas(
    keyring: KeyRing, snapshots_dir: Path, chain: Sequence[IndexSnapshot]
) -> list[DeltaPayload]:
    """The deltas of ``chain`` (from :func:`chain_of`) after its first row, each checked to
    apply on top of the row before it. Raises SnapshotError as :func:`read_delta`."""
    return [
        read_delta(keyring, snapshots_dir, row, base_version=base.version)
        for base, row in itertools.pairwise(chain)
    ]


def searchable(session: Session, entry_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """For each of ``entry_ids``: it exists, is enabled and its bank is enabled (one query
    per 10,000 ids)."""
    found: set[int] = set()
    ids = entry_ids.tolist()
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        found.update(
            session.scalars(
                select(Entry.id)
                .join(Bank, Entry.bank_id == Bank.id)
                .where(Entry.id.in_(chunk), Entry.disabled.is_(False), Bank.enabled.is_(True))
            )
        )
    return np.fromiter((eid in found for eid in ids), np.bool_, len(ids))


def searchable_count(session: Session) -> int:
    """Entries enabled in enabled banks (a version's ``entry_count``)."""
    query = (
        select(func.count())
        .select_from(Entry)
        .join(Bank, Entry.bank_id == Bank.id)
        .where(Entry.disabled.is_(False), Bank.enabled.is_(True))
    )
    return int(session.scalar(query) or 0)


def add_row(
    session: Session,
    written: SnapshotFile,
    *,
    entry_count: int,
    base_version: int | None = None,
    changed_entries: int = 0,
    compacted_from: int | None = None,
) -> IndexSnapshot:
    """Add (and flush) the ``index_snapshots`` row recording the file just written
    (``entry_count``: its searchable entries; the rest as in the module docstring)."""
    row = IndexSnapshot(
        version=written.version,
        snapshot_id=written.snapshot_id,
        encoder_id=written.encoder_id,
        key_id=written.key_id,
        sha256=written.sha256,
        path=written.path.name,
        entry_count=entry_count,
        size_bytes=written.size_bytes,
        base_version=base_version,
        changed_entries=changed_entries,
        compacted_from=compacted_from,
    )
    session.add(row)
    session.flush()
    return row


def write_delta(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    base: IndexSnapshot,
    delta: DeltaPayload,
    version: int,
) -> tuple[IndexSnapshot, SnapshotFile]:
    """Write ``delta`` (its active masks set from the database) as version ``version`` on top
    of ``base`` and add (and flush) its row; the caller commits, or deletes the file on
    failure. Time proportional to the delta.

    Raises:
        ValueError: ``delta`` is not based on ``base``.
        SnapshotError: the file cannot be written.
    """
    if delta.base_version != base.version:
        raise ValueError(f"the delta builds on v{delta.base_version}, not v{base.version}")
    segment = delta.segment
    segment.active = searchable(session, segment.entry_ids)
    segment.hashes.active = searchable(session, segment.hashes.entry_ids)
    snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = write_snapshot(
        snapshots_dir,
        delta.to_bytes(),
        snapshot_id=uuid.uuid4().hex,
        version=version,
        encoder_id=base.encoder_id,
        keyring=keyring,
    )
    row = add_row(
        session,
        written,
        entry_count=searchable_count(session),
        base_version=base.version,
        changed_entries=len(delta),
    )
    logger.info(
        "delta snapshot v%d on v%d written: %d added, %d removed, %d bytes",
        row.version,
        base.version,
        len(segment.entry_ids) + len(segment.hashes),
        len(delta.tombstones),
        written.size_bytes,
    )
    return row, written
