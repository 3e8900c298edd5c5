"""The decrypted, in-memory blocklist of one snapshot version, as workers load it.

Entry metadata lives in SQL (:mod:`moderation.banks.records`); every entry's signals
(embedding, PDQ digest, region embeddings; for hash-list entries a PDQ digest, keyed exact
hashes or a vPDQ signature, :mod:`moderation.banks.hash_entries`) live only in the current
encrypted snapshot (:mod:`moderation.banks.versions`, payload in
:mod:`moderation.banks.snapshot_payload`). :func:`load_blocklist` decrypts the current version
and builds its indexes, using the snapshot's stored cosine index when it holds exactly the
loaded entries; :func:`catch_up` applies later delta versions to a loaded blocklist in place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from moderation.banks.delta_chain import chain_of, read_delta
from moderation.banks.hash_entries import UNKNOWN_QUALITY, HashEntries
from moderation.banks.index import CosineIndex, HammingIndex, load_index
from moderation.banks.records import EntryInfo, entry_infos
from moderation.banks.rowfile import RowArray
from moderation.banks.snapshot import SnapshotError
from moderation.banks.snapshot_delta import DeltaPayload
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import (
    EncoderMismatchError,
    current_snapshot,
    read_payload,
    snapshot_exact_key,
)
from moderation.banks.vpdq_scan import VpdqScan
from moderation.crypto.keys import KeyRing
from moderation.signals.exact import EXACT_KINDS
from moderation.storage.models import IndexSnapshot

logger = logging.getLogger(__name__)


@dataclass
class Blocklist:
    """The decrypted, in-memory blocklist of one snapshot version: indexes plus entry metadata.

    Only active entries (entry enabled, bank enabled) are in the indexes. Delta versions are
    applied in place (:meth:`apply_delta`): their segments are kept beside ``payload``, the
    indexes grow and shrink, and ``version`` moves on. Searches and lookups that must not
    overlap an update take ``guard`` (the screener does).
    """

    version: int
    snapshot_id: str | None
    encoder_id: str
    entries: dict[int, EntryInfo]
    cosine: CosineIndex
    pdq: HammingIndex
    payload: Payload
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # HMAC key of the keyed exact hashes (None: no hash-list entry has one).
    exact_key: bytes | None = None
    # The vPDQ signatures of active hash-list entries (video uploads are matched against them).
    vpdq: VpdqScan = field(default_factory=VpdqScan.empty)
    _rows: dict[int, int] = field(default_factory=dict)
    _hash_rows: dict[int, int] = field(default_factory=dict)
    _exact: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)
    # Delta segments applied in place, oldest first, and where each of their entries is.
    segments: list[Payload] = field(default_factory=list)
    _segment_rows: dict[int, tuple[Payload, int]] = field(default_factory=dict)
    _segment_hash_rows: dict[int, tuple[HashEntries, int]] = field(default_factory=dict)
    guard: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self._rows = {int(eid): row for row, eid in enumerate(self.payload.entry_ids)}
        hashes = self.payload.hashes
        self._hash_rows = {int(eid): row for row, eid in enumerate(hashes.entry_ids.tolist())}
        self._exact = hashes.exact_owners(self.entries)  # active entries only

    def __len__(self) -> int:
        """Entries with an embedding (the cosine index's size)."""
        return len(self.cosine)

    def has_vector(self, entry_id: int) -> bool:
        """True when the entry has an embedding (an image entry, not a hash-list entry)."""
        return entry_id in self._rows or entry_id in self._segment_rows

    def exact_matches(self, keyed: Mapping[str, bytes]) -> list[tuple[int, str]]:
        """Active entries whose exact hash equals one of the upload's keyed digests
        (kind -> 32 bytes, :func:`moderation.signals.exact.keyed_digests`): (entry id, kind)."""
        found: list[tuple[int, str]] = []
        for kind_index, kind in enumerate(EXACT_KINDS):
            value = keyed.get(kind)
            if value is not None:
                found.extend((eid, kind) for eid in self._exact.get((kind_index, value), ()))
        return found

    def vector_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The stored global embedding of an entry, float32 (d,).

        Raises:
            KeyError: the entry is not in this snapshot.
        """
        if entry_id in self._segment_rows:
            segment, at = self._segment_rows[entry_id]
            found: npt.NDArray[np.float32] = segment.vectors[at]
            return found
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
        """The stored PDQ digest (32 bytes) and quality (0-100) of an entry. A hash-list entry
        whose list gave no quality counts as quality 100 (the list's owner vouched for it).

        Raises:
            KeyError: the entry is not in this snapshot or has no PDQ digest.
        """
        if entry_id in self._segment_rows:
            segment, at = self._segment_rows[entry_id]
            return segment.pdq[at].tobytes(), int(segment.pdq_quality[at])
        row = self._rows.get(entry_id)
        if row is not None:
            return self.payload.pdq[row].tobytes(), int(self.payload.pdq_quality[row])
        hashes, hrow = self._segment_hash_rows.get(entry_id) or (
            self.payload.hashes,
            self._hash_rows[entry_id],
        )
        if not hashes.has_pdq[hrow]:
            raise KeyError(entry_id)
        quality = int(hashes.pdq_quality[hrow])
        return hashes.pdq[hrow].tobytes(), 100 if quality == UNKNOWN_QUALITY else quality

    def regions_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The stored region embeddings of an entry, float32 (r, d) (r may be 0)."""
        if entry_id in self._segment_rows:
            return self.segment_regions_of(entry_id)
        regions: npt.NDArray[np.float32] = self.payload.region_vectors[
            self.payload.region_entry_ids == entry_id
        ]
        return regions

    def segment_regions_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The region embeddings of an entry added by a delta applied in place, float32
        (r, d); (0, d) for any other entry."""
        found = self._segment_rows.get(entry_id)
        if found is None:
            return np.zeros((0, self.payload.dim), np.float32)
        segment = found[0]
        regions: npt.NDArray[np.float32] = segment.region_vectors[
            segment.region_entry_ids == entry_id
        ]
        return regions

    def apply_delta(
        self,
        row: IndexSnapshot,
        delta: DeltaPayload,
        infos: Mapping[int, EntryInfo],
        exact_key: bytes | None,
    ) -> None:
        """Apply delta version ``row`` in place: its tombstoned entries leave the indexes and
        the exact-hash tables, its segment's active entries (those in ``infos``) join them,
        and ``version`` becomes ``row.version``. Time proportional to the delta (FAISS
        ``remove``/``add``; a zero-copy stored index is copied once, at its first change).

        Raises:
            ValueError: the delta is not based on this blocklist's version.
        """
        if delta.base_version != self.version or row.base_version != self.version:
            raise ValueError(
                f"delta v{row.version} applies on top of v{delta.base_version}, "
                f"not on this blocklist's v{self.version}"
            )
        gone = delta.tombstones.tolist()
        with self.guard:
            self.cosine.remove(gone)
            self.pdq.remove(gone)
            self._forget(gone)
            self._add_segment(delta.segment, infos)
            if exact_key is not None:
                self.exact_key = exact_key
            self.moved_to(row.snapshot_id, row.version)
            self.loaded_at = datetime.now(UTC)

    def moved_to(self, snapshot_id: str | None, version: int) -> None:
        """This blocklist now serves ``snapshot_id`` / ``version`` (a delta applied, or a
        compacted version of the same entries); its cosine index is told too
        (:meth:`CosineIndex.serves_version`: a sharded index asks its shards for it)."""
        with self.guard:
            self.version, self.snapshot_id = version, snapshot_id
            self.cosine.serves_version(snapshot_id, version)

    def _forget(self, gone: list[int]) -> None:
        """Drop removed entries from the metadata and the exact-hash tables."""
        dropped = {eid for eid in gone if self.entries.pop(eid, None) is not None}
        for eid in gone:
            self._rows.pop(eid, None)
            self._hash_rows.pop(eid, None)
            self._segment_rows.pop(eid, None)
            self._segment_hash_rows.pop(eid, None)
        ids = np.fromiter(dropped, np.int64, len(dropped))
        for hashes in (self.payload.hashes, *(segment.hashes for segment in self.segments)):
            for row in hashes.exact_rows(ids).tolist():
                key = (int(hashes.exact_kinds[row]), hashes.exact_keyed[row].tobytes())
                owners = [eid for eid in self._exact.get(key, ()) if eid not in dropped]
                if owners:
                    self._exact[key] = owners
                else:
                    self._exact.pop(key, None)

    def _add_segment(self, segment: Payload, infos: Mapping[int, EntryInfo]) -> None:
        """Index a delta's segment: its active entries known in ``infos``."""
        known = np.fromiter(infos, np.int64, len(infos))
        mask = segment.active & np.isin(segment.entry_ids, known)
        hashes = segment.hashes
        hash_mask = hashes.active & hashes.has_pdq & np.isin(hashes.entry_ids, known)
        ids = segment.entry_ids[mask]
        self.cosine.add(ids, segment.vectors[mask])
        self.pdq.add(
            np.concatenate([ids, hashes.entry_ids[hash_mask]]),
            np.concatenate([segment.pdq[mask], hashes.pdq[hash_mask]]),
        )
        self.entries.update(infos)
        for at, eid in enumerate(segment.entry_ids.tolist()):
            self._segment_rows[eid] = (segment, at)
        for at, eid in enumerate(hashes.entry_ids.tolist()):
            self._segment_hash_rows[eid] = (hashes, at)
        for owner_key, owners in hashes.exact_owners(self.entries).items():
            self._exact.setdefault(owner_key, []).extend(owners)
        self.segments.append(segment)


def load_blocklist(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    *,
    encoder_id: str,
    dim: int,
    own_chain: bool = False,
) -> Blocklist:
    """Decrypt the current snapshot and build its in-memory indexes: for a delta version, the
    full version its chain starts from (with its stored index), then each delta applied in
    place as :func:`catch_up` does.

    With no snapshot yet (no bank ever imported) the blocklist is empty. ``own_chain``: the
    newest snapshot of ``encoder_id``'s chain, not the serving one (an encoder migration's
    shadow, :mod:`moderation.banks.encoder_chains`).

    Raises:
        EncoderMismatchError: the snapshot's encoder id differs from ``encoder_id``.
        SnapshotError: the snapshot cannot be decrypted or verified, or a delta of its chain
            is missing, altered or out of order (screening must not run).
    """
    row = current_snapshot(session, encoder_id if own_chain else None)
    if row is None:
        payload = Payload.empty(encoder_id, dim)
        return _build(None, payload, {}, version=0)
    if row.encoder_id != encoder_id:
        raise EncoderMismatchError(
            f"snapshot v{row.version} ({row.snapshot_id}) was built with encoder "
            f"{row.encoder_id}, but this process runs {encoder_id}: refusing to screen"
        )
    chain = chain_of(session, row)
    full = chain[0]
    payload = read_payload(session, keyring, snapshots_dir, full)
    if payload.dim != dim:
        raise EncoderMismatchError(
            f"snapshot v{full.version} holds {payload.dim}-d vectors; the encoder gives {dim}-d"
        )
    hashes = payload.hashes
    active_ids = [
        *payload.entry_ids[payload.active].tolist(),
        *hashes.entry_ids[hashes.active].tolist(),
    ]
    infos = entry_infos(session, active_ids, keyring)
    exact_key = snapshot_exact_key(session, keyring, full, payload)
    blocklist = _build(full, payload, infos, version=full.version, exact_key=exact_key)
    _apply_chain(session, keyring, snapshots_dir, blocklist, chain[1:])
    return blocklist


def _apply_chain(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    blocklist: Blocklist,
    deltas: Sequence[IndexSnapshot],
) -> None:
    """Apply delta rows ``deltas`` (oldest first, the first based on ``blocklist``'s version)
    in place. Raises SnapshotError as :func:`moderation.banks.delta_chain.read_delta`."""
    for row in deltas:
        base_version = blocklist.version
        delta = read_delta(keyring, snapshots_dir, row, base_version=base_version)
        segment = delta.segment
        active = [
            *segment.entry_ids[segment.active].tolist(),
            *segment.hashes.entry_ids[segment.hashes.active].tolist(),
        ]
        infos = entry_infos(session, active, keyring)
        exact_key = blocklist.exact_key
        if exact_key is None and len(segment.hashes.exact_entry_ids):
            exact_key = snapshot_exact_key(session, keyring, row, segment)
        blocklist.apply_delta(row, delta, infos, exact_key)
        logger.info(
            "delta v%d applied in place on v%d (%d added, %d removed)",
            row.version,
            base_version,
            len(active),
            len(delta.tombstones),
        )


def _cosine_index(
    payload: Payload, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]
) -> CosineIndex:
    """The payload's stored index when it holds ``ids`` (entries beyond them removed), else
    one built now."""
    if payload.cosine_index is not None:
        try:
            # Every byte was authenticated by the snapshot's AES-GCM tag: a failure here is a
            # bug, or an ivf_disk row file that is missing or not this version's.
            stored = load_index(payload.cosine_index, authenticated=True, row_dir=payload.row_dir)
        except ValueError as exc:
            raise SnapshotError(f"the stored cosine index is unreadable: {exc}") from exc
        if (
            isinstance(stored, CosineIndex)
            and stored.dim == payload.dim
            and np.isin(ids, stored.ids()).all()
        ):
            # Entries the database no longer knows: dropped here, not by a rebuild.
            stored.remove(np.setdiff1d(stored.ids(), ids).tolist())
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
    exact_key: bytes | None = None,
) -> Blocklist:
    known = np.fromiter(infos, np.int64, len(infos))
    mask = payload.active & np.isin(payload.entry_ids, known)
    ids = payload.entry_ids[mask]
    cosine = _cosine_index(payload, ids, mask)
    hashes = payload.hashes
    listed = np.isin(hashes.entry_ids, known)
    hash_mask = hashes.active & hashes.has_pdq & listed
    pdq = HammingIndex.build(
        np.concatenate([ids, hashes.entry_ids[hash_mask]]),
        np.concatenate([payload.pdq[mask], hashes.pdq[hash_mask]]),
    )
    return Blocklist(
        version=version,
        snapshot_id=row.snapshot_id if row else None,
        encoder_id=payload.encoder_id,
        entries=dict(infos),
        cosine=cosine,
        pdq=pdq,
        payload=payload,
        exact_key=exact_key,
        vpdq=VpdqScan.of(
            hashes, hashes.entry_ids[hashes.active & np.isin(hashes.entry_ids, known)]
        ),
    )


def catch_up(session: Session, keyring: KeyRing, snapshots_dir: Path, blocklist: Blocklist) -> bool:
    """Bring ``blocklist`` to the serving chain's newest version by applying the delta
    versions after its own in place (:meth:`Blocklist.apply_delta`), without reloading it.

    Applies when the newest version is a delta whose chain passes through ``blocklist``'s
    version, or whose full version compaction wrote from ``blocklist``'s version (then only
    the version number moves on; not for a blocklist reading row files, which are pruned with
    their version: it reloads, opening the compacted version's and dropping its RAM rows).
    Returns False when it does not apply (the caller reloads in full:
    :func:`load_blocklist`), True once the blocklist is current.

    Raises:
        SnapshotError: a delta is missing, altered or out of order; the blocklist stays at
            the last version applied, and the caller reloads in full (which refuses the same
            chain: fail closed).
    """
    head = current_snapshot(session)
    if head is None or head.encoder_id != blocklist.encoder_id:
        return False
    if head.version == blocklist.version:
        return True
    chain = chain_of(session, head)
    versions = [row.version for row in chain]
    if blocklist.version in versions:
        start = versions.index(blocklist.version) + 1
    elif chain[0].compacted_from == blocklist.version and not _holds_row_files(blocklist):
        blocklist.moved_to(chain[0].snapshot_id, chain[0].version)
        start = 1
    else:
        return False
    _apply_chain(session, keyring, snapshots_dir, blocklist, chain[start:])
    return True


def _holds_row_files(blocklist: Blocklist) -> bool:
    """Whether ``blocklist`` reads its full version's row files (``ivf_disk`` rows, region
    rows): a worker holding them open would keep a pruned version's disk space (tens of GB at
    10M entries) and the rows its deltas added in RAM."""
    return blocklist.cosine.row_path is not None or isinstance(
        blocklist.payload.region_vectors, RowArray
    )
