"""Banks, entries and the encrypted index snapshot that holds their signals.

Entry metadata lives in SQL; every entry's signals (embedding, PDQ digest, region embeddings)
live only in the current encrypted snapshot. Every change to what is searchable (import,
disable, enable, delete, erasure, bank on/off) writes a new snapshot version in the same
transaction as the metadata change; workers notice the version and reload.

Snapshot payload (``moderation.banks.payload.encode_payload``), format 1:

======================  =================  ===============================================
array                   dtype, shape       meaning
======================  =================  ===============================================
``entry_ids``           int64 (n,)         entry primary keys
``vectors``             float32 (n, d)     unit-norm global embeddings; (n - a, d), the
                                           inactive entries' rows only, when the meta field
                                           ``vectors_in_index`` is true (below)
``pdq``                 uint8 (n, 32)      PDQ digests, ThreatExchange bit order
``pdq_quality``         uint8 (n,)         PDQ quality 0-100
``active``              bool (n,)          entry enabled and its bank enabled
``region_entry_ids``    int64 (m,)         owner entry of each region embedding
``region_vectors``      float32 (m, d)     unit-norm region embeddings (classifier stage)
``cosine_index``        uint8 (b,)         optional: the active entries' cosine index,
                                           ``CosineIndex.serialize()`` bytes (its header
                                           records algorithm and parameters)
======================  =================  ===============================================

``cosine_index`` is written for banks of at least :data:`STORED_INDEX_MIN_ENTRIES` active
entries, where building the index (an HNSW graph, or for the largest banks the projection
learned from the bank plus the graph) costs far more than reading it: it is built once when
the bank changes, not by every worker at every load. Payloads without it (older snapshots,
small banks) are indexed at load as before, and so is one whose stored index does not hold
exactly the entries being loaded.

With a stored index, the active entries' global embeddings are not written a second time: the
index keeps them (``ivf_pca`` and ``hnsw_pca``: as float16 codes, each component to about 5e-4
relative), and ``vectors`` holds only the inactive entries' rows, in entry order (meta
``vectors_in_index``). That drops 5,120 bytes per entry (1280-d float32 rows) from a large
bank's snapshot and from what a worker must decrypt at load. Workers read single embeddings from
the index (:meth:`Blocklist.vector_of`); the writer decodes them all
(:meth:`Payload.full_vectors`) only when it builds the next version. Decoded float16 values
re-encode to the same codes, so vectors do not drift from version to version.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from moderation.banks.index import HNSW_MIN_ENTRIES, CosineIndex, HammingIndex, load_index
from moderation.banks.payload import decode_payload, encode_payload
from moderation.banks.snapshot import (
    SnapshotError,
    SnapshotFile,
    read_snapshot,
    write_snapshot,
)
from moderation.crypto import KeyRing
from moderation.storage.models import Bank, Entry, IndexSnapshot

logger = logging.getLogger(__name__)

#: Active entries from which a snapshot carries its built cosine index (the size at which
#: ``CosineIndex.build`` switches from exact search to HNSW).
STORED_INDEX_MIN_ENTRIES = HNSW_MIN_ENTRIES

PAYLOAD_FORMAT = 1
PDQ_BYTES = 32

# Arbitrary constant naming the PostgreSQL advisory lock that serialises snapshot writers.
_SNAPSHOT_LOCK_KEY = 0x6D6F645F736E6170  # "mod_snap"


class BlocklistError(Exception):
    """A bank or entry operation was refused (unknown bank, bad kind, ...)."""


class EncoderMismatchError(BlocklistError):
    """The snapshot was built by another encoder: embeddings would not be comparable."""


@dataclass(frozen=True)
class EntrySignals:
    """The signals of one new entry, computed at import before the original is discarded.

    ``vector`` is float32 (d,) unit-norm; ``pdq`` 32 bytes; ``regions`` float32 (r, d).
    """

    entry_id: int
    vector: npt.NDArray[np.float32]
    pdq: bytes
    pdq_quality: int
    regions: npt.NDArray[np.float32] | None = None


@dataclass
class Payload:
    """A decrypted snapshot payload (see the module docstring for the arrays)."""

    encoder_id: str
    dim: int
    entry_ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    pdq: npt.NDArray[np.uint8]
    pdq_quality: npt.NDArray[np.uint8]
    active: npt.NDArray[np.bool_]
    region_entry_ids: npt.NDArray[np.int64]
    region_vectors: npt.NDArray[np.float32]
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # Serialized CosineIndex of the active entries, or None (see the module docstring).
    cosine_index: bytes | memoryview | None = None
    # True: ``vectors`` holds only the inactive entries' rows; the rest are in ``cosine_index``.
    vectors_in_index: bool = False

    @classmethod
    def empty(cls, encoder_id: str, dim: int) -> Payload:
        """A payload with no entries."""
        return cls(
            encoder_id=encoder_id,
            dim=dim,
            entry_ids=np.zeros(0, np.int64),
            vectors=np.zeros((0, dim), np.float32),
            pdq=np.zeros((0, PDQ_BYTES), np.uint8),
            pdq_quality=np.zeros(0, np.uint8),
            active=np.zeros(0, np.bool_),
            region_entry_ids=np.zeros(0, np.int64),
            region_vectors=np.zeros((0, dim), np.float32),
        )

    def to_bytes(self, *, index_holds_active: bool = False) -> bytes:
        """Serialise (no pickle) for encryption.

        Args:
            index_holds_active: the caller built ``cosine_index`` from exactly the active
                entries' rows of ``vectors``: only the inactive entries' rows are written (see
                the module docstring). A payload read that way is written that way again.
        """
        vectors, in_index = self.vectors, self.vectors_in_index
        if not in_index and index_holds_active:
            if self.cosine_index is None:
                raise ValueError("index_holds_active needs a stored index")
            vectors, in_index = self.vectors[~self.active], True
        arrays: dict[str, np.ndarray[Any, Any]] = {
            "entry_ids": self.entry_ids,
            "vectors": vectors,
            "pdq": self.pdq,
            "pdq_quality": self.pdq_quality,
            "active": self.active,
            "region_entry_ids": self.region_entry_ids,
            "region_vectors": self.region_vectors,
        }
        if self.cosine_index is not None:
            arrays["cosine_index"] = np.frombuffer(self.cosine_index, dtype=np.uint8)
        meta = {
            "format": PAYLOAD_FORMAT,
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            **self.extra_meta,
        }
        if in_index:
            meta["vectors_in_index"] = True
        return encode_payload(arrays, meta)

    def _stored(self) -> CosineIndex:
        """The stored cosine index (``cosine_index`` must be set; every byte of it was
        authenticated with the snapshot, or built by this process).

        Raises:
            ValueError: it does not parse as a cosine index.
        """
        assert self.cosine_index is not None
        index = load_index(self.cosine_index, authenticated=True)
        if not isinstance(index, CosineIndex) or index.dim != self.dim:
            raise ValueError("the stored index is not a cosine index of the payload's width")
        return index

    def full_vectors(self) -> npt.NDArray[np.float32]:
        """Every entry's global embedding, float32 (n, d), decoding the active entries' rows
        from the stored index when the payload keeps them there (then cached: this payload
        holds full vectors from now on).

        Raises:
            ValueError: the stored index does not hold the active entries.
        """
        if not self.vectors_in_index:
            return self.vectors
        full = np.empty((len(self.entry_ids), self.dim), dtype=np.float32)
        full[~self.active] = self.vectors
        try:
            full[self.active] = self._stored().reconstruct(self.entry_ids[self.active])
        except KeyError as exc:
            raise ValueError(f"the stored index lacks an active entry: {exc}") from exc
        self.vectors, self.vectors_in_index = full, False
        return full

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Payload:
        """Parse a decrypted payload.

        Raises:
            ValueError: unknown format or inconsistent shapes.
        """
        arrays, meta = decode_payload(data)
        if meta.get("format") != PAYLOAD_FORMAT:
            raise ValueError(f"unknown snapshot payload format {meta.get('format')!r}")
        dim = int(meta["dim"])
        in_index = meta.get("vectors_in_index", False)
        if not isinstance(in_index, bool) or (in_index and "cosine_index" not in arrays):
            raise ValueError("vectors_in_index must be a boolean, and needs a stored index")
        payload = cls(
            encoder_id=str(meta["encoder_id"]),
            dim=dim,
            entry_ids=arrays["entry_ids"].astype(np.int64, copy=False),
            vectors=arrays["vectors"].astype(np.float32, copy=False).reshape(-1, dim),
            pdq=arrays["pdq"].astype(np.uint8, copy=False).reshape(-1, PDQ_BYTES),
            pdq_quality=arrays["pdq_quality"].astype(np.uint8, copy=False),
            active=arrays["active"].astype(np.bool_, copy=False),
            region_entry_ids=arrays["region_entry_ids"].astype(np.int64, copy=False),
            region_vectors=arrays["region_vectors"].astype(np.float32, copy=False).reshape(-1, dim),
            extra_meta={
                k: v
                for k, v in meta.items()
                if k not in {"format", "encoder_id", "dim", "vectors_in_index"}
            },
            vectors_in_index=in_index,
            # A view into the decrypted payload, not a copy (gigabytes for large banks).
            cosine_index=(
                arrays["cosine_index"].astype(np.uint8, copy=False).data
                if "cosine_index" in arrays
                else None
            ),
        )
        n = len(payload.entry_ids)
        rows = int((~payload.active).sum()) if in_index else n
        if not (len(payload.vectors) == rows and len(payload.pdq) == len(payload.active) == n):
            raise ValueError("snapshot payload arrays disagree in length")
        if len(payload.region_entry_ids) != len(payload.region_vectors):
            raise ValueError("snapshot payload region arrays disagree in length")
        return payload

    def without(self, removed: Iterable[int]) -> Payload:
        """A copy without the entries in ``removed`` (and their regions)."""
        removed_ids = np.fromiter(removed, dtype=np.int64)
        vectors = self.full_vectors()
        keep = ~np.isin(self.entry_ids, removed_ids)
        keep_regions = ~np.isin(self.region_entry_ids, removed_ids)
        return Payload(
            encoder_id=self.encoder_id,
            dim=self.dim,
            entry_ids=self.entry_ids[keep],
            vectors=vectors[keep],
            pdq=self.pdq[keep],
            pdq_quality=self.pdq_quality[keep],
            active=self.active[keep],
            region_entry_ids=self.region_entry_ids[keep_regions],
            region_vectors=self.region_vectors[keep_regions],
            extra_meta=dict(self.extra_meta),
        )

    def with_added(self, signals: Sequence[EntrySignals]) -> Payload:
        """A copy with new entries appended (active)."""
        if not signals:
            return self
        existing = self.full_vectors()
        vectors = np.stack([s.vector for s in signals]).astype(np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, snapshot {self.dim}")
        regions = [
            (s.entry_id, s.regions) for s in signals if s.regions is not None and len(s.regions)
        ]
        region_ids = (
            np.concatenate([np.full(len(r), eid, np.int64) for eid, r in regions])
            if regions
            else np.zeros(0, np.int64)
        )
        region_vecs = (
            np.concatenate([r for _, r in regions]).astype(np.float32)
            if regions
            else np.zeros((0, self.dim), np.float32)
        )
        return Payload(
            encoder_id=self.encoder_id,
            dim=self.dim,
            entry_ids=np.concatenate([self.entry_ids, [s.entry_id for s in signals]]).astype(
                np.int64
            ),
            vectors=np.concatenate([existing, vectors]),
            pdq=np.concatenate(
                [self.pdq, np.stack([np.frombuffer(s.pdq, np.uint8) for s in signals])]
            ),
            pdq_quality=np.concatenate(
                [self.pdq_quality, np.array([s.pdq_quality for s in signals], np.uint8)]
            ),
            active=np.concatenate([self.active, np.ones(len(signals), np.bool_)]),
            region_entry_ids=np.concatenate([self.region_entry_ids, region_ids]),
            region_vectors=np.concatenate([self.region_vectors, region_vecs]),
            extra_meta=dict(self.extra_meta),
        )


@dataclass(frozen=True)
class EntryInfo:
    """What screening needs to know about a matched entry (no signals)."""

    entry_id: int
    bank_id: int
    bank_name: str
    bank_kind: str
    category: str
    label: str

    @property
    def public_id(self) -> str:
        """``e_<n>`` as shown in APIs."""
        return f"e_{self.entry_id}"


@dataclass
class Blocklist:
    """The decrypted, in-memory blocklist of one snapshot version: indexes plus entry metadata.

    Only active entries (entry enabled, bank enabled) are in the indexes.
    """

    version: int
    snapshot_id: str | None
    encoder_id: str
    entries: dict[int, EntryInfo]
    cosine: CosineIndex
    pdq: HammingIndex
    payload: Payload
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _rows: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rows = {int(eid): row for row, eid in enumerate(self.payload.entry_ids)}

    def __len__(self) -> int:
        return len(self.cosine)

    def vector_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The stored global embedding of an entry, float32 (d,).

        Raises:
            KeyError: the entry is not in this snapshot.
        """
        row = self._rows[entry_id]
        payload = self.payload
        if not payload.vectors_in_index:
            vector: npt.NDArray[np.float32] = payload.vectors[row]
            return vector
        if payload.active[row]:  # kept in the stored index, which is self.cosine
            vector = self.cosine.reconstruct([entry_id])[0]
        else:
            vector = payload.vectors[int(np.count_nonzero(~payload.active[:row]))]
        return vector

    def pdq_of(self, entry_id: int) -> tuple[bytes, int]:
        """The stored PDQ digest (32 bytes) and quality of an entry."""
        row = self._rows[entry_id]
        return self.payload.pdq[row].tobytes(), int(self.payload.pdq_quality[row])

    def regions_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The stored region embeddings of an entry, float32 (r, d) (r may be 0)."""
        regions: npt.NDArray[np.float32] = self.payload.region_vectors[
            self.payload.region_entry_ids == entry_id
        ]
        return regions


# --- banks and entries --------------------------------------------------------------------


def create_bank(
    session: Session, name: str, *, kind: str = "block", category: str = "default"
) -> Bank:
    """Create a bank.

    Raises:
        BlocklistError: bad kind, empty name, or the name is taken.
    """
    if kind not in ("block", "allow"):
        raise BlocklistError(f"bank kind must be 'block' or 'allow', not {kind!r}")
    if not name.strip():
        raise BlocklistError("bank name must not be empty")
    if session.scalar(select(Bank).where(Bank.name == name)) is not None:
        raise BlocklistError(f"bank {name!r} already exists")
    bank = Bank(name=name, kind=kind, category=category or "default", enabled=True)
    session.add(bank)
    session.flush()
    return bank


def get_bank(session: Session, name: str) -> Bank:
    """The bank called ``name``.

    Raises:
        BlocklistError: no such bank.
    """
    bank = session.scalar(select(Bank).where(Bank.name == name))
    if bank is None:
        known = session.scalars(select(Bank.name).order_by(Bank.name)).all()
        raise BlocklistError(f"no bank named {name!r} (banks: {list(known)})")
    return bank


def parse_entry_id(text_id: str | int) -> int:
    """Accept ``e_12``, ``12`` or 12.

    Raises:
        BlocklistError: anything else.
    """
    raw = str(text_id).strip()
    raw = raw[2:] if raw.startswith("e_") else raw
    if not raw.isdigit():
        raise BlocklistError(f"not an entry id: {text_id!r} (expected e_<number>)")
    return int(raw)


# --- snapshots ------------------------------------------------------------------------------


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


def _active_mask(session: Session, entry_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    rows = session.execute(
        select(Entry.id, Entry.disabled, Bank.enabled).join(Bank, Entry.bank_id == Bank.id)
    ).all()
    state = {eid: (not disabled) and enabled for eid, disabled, enabled in rows}
    return np.array([state.get(int(eid), False) for eid in entry_ids], dtype=np.bool_)


def commit_signals(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    encoder_id: str,
    dim: int,
    added: Sequence[EntrySignals] = (),
    removed: Iterable[int] = (),
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
    row = current_snapshot(session)
    if row is None:
        payload = Payload.empty(encoder_id, dim)
        version = 1
    else:
        if row.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"snapshot v{row.version} was built with encoder {row.encoder_id}; this process "
                f"runs {encoder_id}. Embeddings from different encoders are not comparable: "
                "configure the snapshot's encoder (MODERATION_ENCODER) or re-import the banks "
                "into a new data directory."
            )
        payload = read_payload(session, keyring, snapshots_dir, row)
        version = row.version + 1
    existing = {int(eid) for eid in session.scalars(select(Entry.id)).all()}
    gone = [int(eid) for eid in payload.entry_ids if int(eid) not in existing]
    payload = payload.without([*removed, *gone]).with_added(added)
    payload.active = _active_mask(session, payload.entry_ids)
    payload.cosine_index = _stored_index(payload)
    snapshot_id = uuid.uuid4().hex
    snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = write_snapshot(
        snapshots_dir,
        payload.to_bytes(index_holds_active=payload.cosine_index is not None),
        snapshot_id=snapshot_id,
        version=version,
        encoder_id=encoder_id,
        keyring=keyring,
    )
    new_row = IndexSnapshot(
        version=version,
        snapshot_id=snapshot_id,
        encoder_id=encoder_id,
        key_id=written.key_id,
        sha256=written.sha256,
        path=written.path.name,
        entry_count=int(payload.active.sum()),
        size_bytes=written.size_bytes,
    )
    session.add(new_row)
    session.flush()
    logger.info(
        "snapshot v%d written: %d entries (%d active), %d bytes",
        version,
        len(payload.entry_ids),
        new_row.entry_count,
        written.size_bytes,
    )
    return new_row, written


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


def load_blocklist(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    *,
    encoder_id: str,
    dim: int,
) -> Blocklist:
    """Decrypt the current snapshot and build its in-memory indexes.

    With no snapshot yet (no bank ever imported) the blocklist is empty.

    Raises:
        EncoderMismatchError: the snapshot's encoder id differs from ``encoder_id``.
        SnapshotError: the snapshot cannot be decrypted or verified (screening must not run).
    """
    row = current_snapshot(session)
    if row is None:
        payload = Payload.empty(encoder_id, dim)
        return _build(None, payload, {}, version=0)
    if row.encoder_id != encoder_id:
        raise EncoderMismatchError(
            f"snapshot v{row.version} ({row.snapshot_id}) was built with encoder "
            f"{row.encoder_id}, but this process runs {encoder_id}: refusing to screen"
        )
    payload = read_payload(session, keyring, snapshots_dir, row)
    if payload.dim != dim:
        raise EncoderMismatchError(
            f"snapshot v{row.version} holds {payload.dim}-d vectors; the encoder gives {dim}-d"
        )
    active_ids = [int(e) for e in payload.entry_ids[payload.active]]
    infos = entry_infos(session, active_ids)
    return _build(row, payload, infos, version=row.version)


def entry_infos(session: Session, entry_ids: Iterable[int]) -> dict[int, EntryInfo]:
    """Metadata for the given entry ids (missing ids are left out)."""
    wanted = list(entry_ids)
    infos: dict[int, EntryInfo] = {}
    for start in range(0, len(wanted), 10_000):
        chunk = wanted[start : start + 10_000]
        rows = session.execute(
            select(Entry.id, Entry.bank_id, Bank.name, Bank.kind, Bank.category, Entry.label)
            .join(Bank, Entry.bank_id == Bank.id)
            .where(Entry.id.in_(chunk))
        ).all()
        for eid, bank_id, bank_name, kind, category, label in rows:
            infos[eid] = EntryInfo(eid, bank_id, bank_name, kind, category, label)
    return infos


def _stored_index(payload: Payload) -> bytes | None:
    """The serialized cosine index of ``payload``'s active entries for a large bank, else None."""
    if int(payload.active.sum()) < STORED_INDEX_MIN_ENTRIES:
        return None
    ids = payload.entry_ids[payload.active]
    return CosineIndex.build(ids, payload.full_vectors()[payload.active]).serialize()


def _cosine_index(
    payload: Payload, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]
) -> CosineIndex:
    """The payload's stored index when it holds exactly ``ids``, else one built now."""
    if payload.cosine_index is not None:
        try:
            # Every byte was authenticated by the snapshot's AES-GCM tag.
            stored = load_index(payload.cosine_index, authenticated=True)
        except ValueError as exc:
            # The payload passed AES-GCM authentication, so this is a bug, not tampering.
            raise SnapshotError(f"the stored cosine index is unreadable: {exc}") from exc
        if (
            isinstance(stored, CosineIndex)
            and stored.dim == payload.dim
            and np.array_equal(stored.ids(), np.sort(ids))
        ):
            return stored
        logger.info("stored cosine index does not match the loaded entries; rebuilding")
    try:
        vectors = payload.full_vectors()
    except ValueError as exc:
        raise SnapshotError(f"the snapshot's vectors cannot be decoded: {exc}") from exc
    return CosineIndex.build(ids, vectors[mask])


def _build(
    row: IndexSnapshot | None,
    payload: Payload,
    infos: Mapping[int, EntryInfo],
    *,
    version: int,
) -> Blocklist:
    mask = payload.active & np.isin(payload.entry_ids, np.fromiter(infos, np.int64, len(infos)))
    ids = payload.entry_ids[mask]
    cosine = _cosine_index(payload, ids, mask)
    pdq = HammingIndex.build(ids, payload.pdq[mask])
    return Blocklist(
        version=version,
        snapshot_id=row.snapshot_id if row else None,
        encoder_id=payload.encoder_id,
        entries=dict(infos),
        cosine=cosine,
        pdq=pdq,
        payload=payload,
    )
