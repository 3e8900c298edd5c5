"""Snapshot versions: committing entries' signals as the next encrypted snapshot version,
reading the current one, and pruning older ones.

Every change to what is searchable (import, disable, enable, delete, erasure, bank on/off)
writes a new snapshot version in the same transaction as the metadata change; workers notice
the version and reload (:func:`moderation.banks.blocklist.load_blocklist`). The payload
format is described in :mod:`moderation.banks.snapshot_payload`.

A change that only adds or removes entries writes a *delta* version
(:mod:`moderation.banks.snapshot_delta`, :mod:`moderation.banks.delta_chain`): the added
entries' signals and the removed ones' ids, in time proportional to the change. Workers apply
it in place (:func:`moderation.banks.blocklist.catch_up`); the compaction job
(:mod:`moderation.banks.compaction`) later writes the chain as one full version. A change that
flips few entries' flags (disable, enable, bank on/off) is written as a delta too
(:mod:`moderation.banks.flag_delta`); other changes write a full version as before.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from moderation.banks.delta_chain import (
    MAX_CHAIN_DELTAS,
    add_row,
    chain_of,
    read_deltas,
    read_version,
    snapshot_path,
    write_delta,
)
from moderation.banks.encoder_chains import encoder_chains
from moderation.banks.flag_delta import active_mask, entry_state, flag_delta
from moderation.banks.hash_entries import HashEntries
from moderation.banks.records import BlocklistError
from moderation.banks.snapshot import (
    SnapshotError,
    SnapshotFile,
    snapshot_filename,
    write_snapshot,
)
from moderation.banks.snapshot_delta import DeltaPayload, compose, without_embeddings
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.crypto.deployment import existing_deployment_secret
from moderation.crypto.keys import KeyRing
from moderation.signals.exact import EXACT_KEY_NAME
from moderation.storage.models import IndexSnapshot

logger = logging.getLogger(__name__)

#: Active entries from which a snapshot carries its built cosine index: the size at which
#: ``CosineIndex.build`` switches from exact search to HNSW (``HNSW_MIN_ENTRIES`` of
#: :mod:`moderation.banks.index.cosine`, equal by test; not imported, as that loads FAISS).
STORED_INDEX_MIN_ENTRIES: Final = 50_000

#: Suffixes of an ``ivf_disk`` row file (``moderation.banks.index.disk.ROWS_SUFFIX``, equal by
#: test; not imported, as that loads FAISS) and of a snapshot's region row file.
ROWS_SUFFIX: Final = ".rows"
REGIONS_SUFFIX: Final = ".regions"
#: Region embeddings from which a snapshot keeps them in an encrypted row file instead of its
#: payload (:meth:`Payload.spill_regions`): 50,000 rows (about 10,000 entries) are 256 MB of
#: float32 that every worker would otherwise hold, and at 10M entries 256 GB.
REGION_FILE_MIN_ROWS: Final = 50_000

_SNAPSHOT_LOCK_KEY = 0x6D6F645F736E6170  # "mod_snap": PostgreSQL advisory lock of snapshot writers


class EncoderMismatchError(BlocklistError):
    """The snapshot was built by another encoder: embeddings would not be comparable."""


def current_snapshot(session: Session, encoder_id: str | None = None) -> IndexSnapshot | None:
    """The newest snapshot row of the serving chain (of ``encoder_id``'s chain when given; see
    :mod:`moderation.banks.encoder_chains`), or None before the first bank import."""
    query = select(IndexSnapshot)
    if encoder_id is None:
        encoder_id = encoder_chains(session).serving_id
    if encoder_id is not None:
        query = query.where(IndexSnapshot.encoder_id == encoder_id)
    return session.scalar(query.order_by(IndexSnapshot.version.desc()).limit(1))


def next_version(session: Session) -> int:
    """The next snapshot version: one sequence for every encoder's chain."""
    newest = session.scalar(select(func.max(IndexSnapshot.version)))
    return 1 if newest is None else int(newest) + 1


def lock_snapshots(session: Session) -> None:
    """Serialise snapshot writers until the transaction ends (PostgreSQL advisory lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SNAPSHOT_LOCK_KEY})


def read_payload(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    row: IndexSnapshot,
    *,
    embeddings: bool = True,
) -> Payload:
    """Decrypt and parse the payload of snapshot ``row`` (in memory only); for a delta
    version, its chain composed: the full version it builds on plus every delta up to ``row``.

    Raises:
        SnapshotError: missing file, tampering, wrong key, substituted snapshot; a delta of
            the chain missing, altered or out of order.

    ``embeddings=False``: a delta version's payload without its embeddings
    (:func:`~moderation.banks.snapshot_delta.without_embeddings`; every file is still
    verified), so that composing the chain decodes none.
    """
    if row.base_version is None:
        return read_full(keyring, snapshots_dir, row)
    chain = chain_of(session, row)
    base = read_full(keyring, snapshots_dir, chain[0])
    deltas = read_deltas(keyring, snapshots_dir, chain)
    if not embeddings:
        base = without_embeddings(base)
        for delta in deltas:
            delta.segment = without_embeddings(delta.segment)
    try:
        return compose(base, deltas)
    except ValueError as exc:
        raise SnapshotError(f"snapshot v{row.version}: its deltas do not compose: {exc}") from exc


def read_full(keyring: KeyRing, snapshots_dir: Path, row: IndexSnapshot) -> Payload:
    """Full version ``row``'s payload, region rows opened, ``row_dir`` set (an ``ivf_disk``
    index's rows lie beside the snapshot). Raises SnapshotError as :func:`read_payload`."""
    payload = read_version(keyring, snapshots_dir, row, Payload.from_bytes)
    path = snapshot_path(snapshots_dir, row)
    try:
        payload.open_regions(path.parent)
    except ValueError as exc:  # RowFileError included
        raise SnapshotError(
            f"snapshot v{row.version} ({row.snapshot_id}) at {path}: bad payload: {exc}"
        ) from exc
    payload.row_dir = path.parent
    return payload


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

    Call inside the transaction that changed entries/banks. When :func:`_delta_fits`, a
    change that adds or removes entries is written as a delta (time proportional to it; active
    masks from the database), and so is one flipping few flags (:mod:`.flag_delta`).
    Otherwise the new payload is the current one minus ``removed`` and entries gone, plus
    ``added``, active masks recomputed from the database. The row is added to ``session``;
    the file is written before the commit (ciphertext only). After the caller commits, prune
    (:mod:`moderation.banks.retention`); if the transaction fails, delete the returned file.

    Raises:
        EncoderMismatchError: the current snapshot was built by another encoder.
        SnapshotError: the current snapshot cannot be read (fail closed: no blind rebuild).
    """
    lock_snapshots(session)
    removed = list(removed)
    base = current_snapshot(session)
    delta = None
    if base is not None and _delta_fits(session, base, encoder_id):
        if added or removed or (added_hashes is not None and len(added_hashes)):
            delta = DeltaPayload.of_change(
                base.version,
                encoder_id,
                dim,
                added=added,
                added_hashes=added_hashes,
                tombstones=removed,
            )
        else:
            delta = _flag_delta(session, keyring, snapshots_dir, base)
    if base is not None and delta is not None:
        return write_delta(
            session,
            keyring=keyring,
            snapshots_dir=snapshots_dir,
            base=base,
            delta=delta,
            version=next_version(session),
        )
    return _commit_full(
        session,
        keyring=keyring,
        snapshots_dir=snapshots_dir,
        encoder_id=encoder_id,
        dim=dim,
        added=added,
        removed=removed,
        added_hashes=added_hashes,
    )


def _commit_full(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    encoder_id: str,
    dim: int,
    added: Sequence[EntrySignals],
    removed: Sequence[int],
    added_hashes: HashEntries | None,
) -> tuple[IndexSnapshot, SnapshotFile]:
    """:func:`commit_signals` as a full version. Raises as :func:`commit_signals`."""
    payload, version = _current_payload(
        session, keyring=keyring, snapshots_dir=snapshots_dir, encoder_id=encoder_id, dim=dim
    )
    snapshot_id = uuid.uuid4().hex
    snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    payload = next_payload(
        session,
        payload,
        added=added,
        removed=removed,
        added_hashes=added_hashes,
        rows_path=rows_path_of(snapshots_dir / snapshot_filename(snapshot_id, version)),
    )
    _spill_regions(payload, snapshots_dir / snapshot_filename(snapshot_id, version))
    written = write_snapshot(
        snapshots_dir,
        payload.to_bytes(index_holds_active=payload.cosine_index is not None),
        snapshot_id=snapshot_id,
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


def _delta_fits(session: Session, base: IndexSnapshot, encoder_id: str) -> bool:
    """Whether a change may be written as a delta on ``base``: it is this encoder's, and its
    chain is shorter than :data:`MAX_CHAIN_DELTAS` (with row files too: a loaded ``ivf_disk``
    index keeps added rows in RAM, :mod:`.index.disk`)."""
    return base.encoder_id == encoder_id and len(chain_of(session, base)) <= MAX_CHAIN_DELTAS


def _flag_delta(
    session: Session, keyring: KeyRing, snapshots_dir: Path, base: IndexSnapshot
) -> DeltaPayload | None:
    """A change that adds and removes nothing (flags flipped) as a delta on ``base``, or None
    (:func:`moderation.banks.flag_delta.flag_delta`). Raises SnapshotError: the chain cannot
    be read or does not compose."""
    chain = chain_of(session, base)
    full = read_full(keyring, snapshots_dir, chain[0])
    try:
        return flag_delta(session, base.version, full, read_deltas(keyring, snapshots_dir, chain))
    except ValueError as exc:
        raise SnapshotError(f"snapshot v{base.version}: flag change: {exc}") from exc


def keeps_row_files(snapshots_dir: Path, row: IndexSnapshot) -> bool:
    """Whether full version ``row`` has row files (``ivf_disk`` rows, region rows): its
    chain is compacted from them (:mod:`moderation.banks.disk_compaction`)."""
    path = snapshot_path(snapshots_dir, row)
    return rows_path_of(path).exists() or path.with_suffix(REGIONS_SUFFIX).exists()


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
        return Payload.empty(encoder_id, dim), next_version(session)
    if row.encoder_id != encoder_id:
        raise EncoderMismatchError(
            f"snapshot v{row.version} was built with encoder {row.encoder_id}; this process "
            f"runs {encoder_id}. Embeddings from different encoders are not comparable: "
            "configure the snapshot's encoder (MODERATION_ENCODER) or re-import the banks "
            "into a new data directory."
        )
    return read_payload(session, keyring, snapshots_dir, row), next_version(session)


def next_payload(
    session: Session,
    payload: Payload,
    *,
    added: Sequence[EntrySignals],
    removed: Iterable[int],
    added_hashes: HashEntries | None = None,
    rows_path: Path | None = None,
) -> Payload:
    """``payload`` minus ``removed`` and entries gone from the database, plus ``added`` (and
    ``added_hashes``), with the active masks recomputed from the database and the stored index
    rebuilt (``rows_path``: where an ``ivf_disk`` index writes its row file, see
    :func:`rows_path_of`; without it a bank never gets one)."""
    ids, searchable = entry_state(session)
    in_payload = np.concatenate([payload.entry_ids, payload.hashes.entry_ids])
    gone = in_payload[~np.isin(in_payload, ids)].tolist()
    payload = payload.without([*removed, *gone]).with_added(added)
    if added_hashes is not None:
        payload.hashes = payload.hashes.with_added(added_hashes)
    payload.active = active_mask(ids, searchable, payload.entry_ids)
    payload.hashes.active = active_mask(ids, searchable, payload.hashes.entry_ids)
    payload.cosine_index = _stored_index(payload, rows_path)
    return payload


def _add_snapshot_row(
    session: Session,
    written: SnapshotFile,
    payload: Payload,
    compacted_from: int | None = None,
) -> IndexSnapshot:
    """Add (and flush) the row recording the full snapshot file just written."""
    active = int(payload.active.sum()) + int(payload.hashes.active.sum())
    return add_row(session, written, entry_count=active, compacted_from=compacted_from)


def pdq_only(payload: Payload) -> HashEntries:
    """``payload``'s image entries as hash entries matched by PDQ alone (no embedding): how
    another encoder's chain holds entries it has no embedding of."""
    n = len(payload.entry_ids)
    return HashEntries(
        entry_ids=payload.entry_ids.copy(),
        pdq=payload.pdq.copy(),
        pdq_quality=payload.pdq_quality.copy(),
        has_pdq=np.ones(n, np.bool_),
        active=payload.active.copy(),
    )


def _signals_by_pdq(added: Sequence[EntrySignals]) -> HashEntries:
    """New image entries as PDQ-only hash entries (active; recomputed from the database)."""
    n = len(added)
    return HashEntries(
        entry_ids=np.fromiter((s.entry_id for s in added), np.int64, n),
        pdq=np.frombuffer(b"".join(s.pdq for s in added), np.uint8).reshape(n, 32),
        pdq_quality=np.fromiter((s.pdq_quality for s in added), np.uint8, n),
        has_pdq=np.ones(n, np.bool_),
        active=np.ones(n, np.bool_),
    )


def write_payload(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    payload: Payload,
    *,
    compacted_from: int | None = None,
) -> tuple[IndexSnapshot, SnapshotFile]:
    """Write ``payload`` (its stored index rebuilt) as the next full version of its encoder's
    chain, adding (and flushing) its row; the caller commits, or deletes the file on failure.
    ``compacted_from``: the version whose content ``payload`` holds unchanged (compaction)."""
    snapshot_id, version = uuid.uuid4().hex, next_version(session)
    snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    rows_path = rows_path_of(snapshots_dir / snapshot_filename(snapshot_id, version))
    payload.cosine_index = _stored_index(payload, rows_path)
    _spill_regions(payload, rows_path)
    written = write_snapshot(
        snapshots_dir,
        payload.to_bytes(index_holds_active=payload.cosine_index is not None),
        snapshot_id=snapshot_id,
        version=version,
        encoder_id=payload.encoder_id,
        keyring=keyring,
    )
    return _add_snapshot_row(session, written, payload, compacted_from), written


def sync_kept_chains(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    added: Sequence[EntrySignals] = (),
    removed: Iterable[int] = (),
    added_hashes: HashEntries | None = None,
) -> list[Path]:
    """After :func:`commit_signals` wrote the serving chain, write the next version of every
    other kept chain with the same change: removed and deleted entries dropped (so erasure
    reaches every kept snapshot), active masks recomputed, added hash entries as they are and
    added image entries by PDQ only (their embedding is the serving encoder's; an encoder
    migration embeds retained originals with its target). Returns the files written.

    Raises:
        SnapshotError: a kept chain's snapshot cannot be read.
    """
    serving = current_snapshot(session)
    removed = list(removed)
    written: list[Path] = []
    for encoder_id in encoder_chains(session).kept_ids:
        row = current_snapshot(session, encoder_id)
        if row is None or serving is None or row.version == serving.version:
            continue
        payload = read_payload(session, keyring, snapshots_dir, row)
        extra = _signals_by_pdq(added)
        if added_hashes is not None:
            extra = extra.with_added(added_hashes)
        payload = next_payload(session, payload, added=(), removed=removed, added_hashes=extra)
        written.append(write_payload(session, keyring, snapshots_dir, payload)[1].path)
    return written


def rows_path_of(snapshot_path: Path) -> Path:
    """The row file of the ``ivf_disk`` index inside a snapshot: ``<snapshot stem>.rows``
    beside it (encrypted under a key kept in the snapshot's payload, see
    :mod:`moderation.banks.rowfile`), pruned with the snapshot."""
    return snapshot_path.with_suffix(ROWS_SUFFIX)


def _spill_regions(payload: Payload, snapshot_path: Path) -> None:
    """Move a large bank's region embeddings to ``<snapshot stem>.regions``."""
    if len(payload.region_entry_ids) >= REGION_FILE_MIN_ROWS:
        path = snapshot_path.with_suffix(REGIONS_SUFFIX)
        path.unlink(missing_ok=True)  # a failed earlier attempt at this version
        payload.spill_regions(path)


def _stored_index(payload: Payload, rows_path: Path | None = None) -> bytes | None:
    """The serialized cosine index of ``payload``'s active entries for a large bank, else
    None; from ``DISK_MIN_ENTRIES`` entries an ``ivf_disk`` one writing ``rows_path``."""
    if int(payload.active.sum()) < STORED_INDEX_MIN_ENTRIES:
        return None
    from moderation.banks.index import CosineIndex  # FAISS, only for a large bank's snapshot

    ids = payload.entry_ids[payload.active]
    vectors = payload.full_vectors()[payload.active]
    if rows_path is None:
        return CosineIndex.build(ids, vectors).serialize()
    rows_path.unlink(missing_ok=True)  # a failed earlier attempt at this version
    return CosineIndex.build(
        ids, vectors, row_dir=rows_path.parent, row_name=rows_path.name
    ).serialize()


def snapshot_exact_key(
    session: Session, keyring: KeyRing, row: IndexSnapshot, payload: Payload
) -> bytes | None:
    """The HMAC key of the keyed exact hashes in snapshot ``row`` (None: it holds none).

    Raises:
        SnapshotError: the snapshot holds exact hashes but the deployment secret is gone.
    """
    if not len(payload.hashes.exact_entry_ids):
        return None
    exact_key = existing_deployment_secret(session, keyring, EXACT_KEY_NAME)
    if exact_key is None:
        raise SnapshotError(
            f"snapshot v{row.version} holds exact hashes but the deployment has no "
            f"{EXACT_KEY_NAME!r} secret: it was deleted, so they can never match"
        )
    return exact_key
