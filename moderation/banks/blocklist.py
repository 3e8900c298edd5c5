"""The decrypted, in-memory blocklist of one snapshot version, as workers load it.

Entry metadata lives in SQL (:mod:`moderation.banks.records`); every entry's signals
(embedding, PDQ digest, region embeddings; for hash-list entries a PDQ digest and keyed exact
hashes, :mod:`moderation.banks.hash_entries`) live only in the current encrypted snapshot
(:mod:`moderation.banks.versions`, payload in :mod:`moderation.banks.snapshot_payload`).
:func:`load_blocklist` decrypts the current version and builds its indexes, using the
snapshot's stored cosine index when it holds exactly the loaded entries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from moderation.banks.hash_entries import UNKNOWN_QUALITY
from moderation.banks.index import CosineIndex, HammingIndex, load_index
from moderation.banks.records import EntryInfo, entry_infos
from moderation.banks.snapshot import SnapshotError
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import (
    EncoderMismatchError,
    current_snapshot,
    read_payload,
    snapshot_exact_key,
)
from moderation.crypto.keys import KeyRing
from moderation.signals.exact import EXACT_KINDS
from moderation.storage.models import IndexSnapshot

logger = logging.getLogger(__name__)


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
    # HMAC key of the keyed exact hashes (None: no hash-list entry has one).
    exact_key: bytes | None = None
    _rows: dict[int, int] = field(default_factory=dict)
    _hash_rows: dict[int, int] = field(default_factory=dict)
    _exact: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)

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
        return entry_id in self._rows

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
        row = self._rows.get(entry_id)
        if row is not None:
            return self.payload.pdq[row].tobytes(), int(self.payload.pdq_quality[row])
        hashes = self.payload.hashes
        hrow = self._hash_rows[entry_id]
        if not hashes.has_pdq[hrow]:
            raise KeyError(entry_id)
        quality = int(hashes.pdq_quality[hrow])
        return hashes.pdq[hrow].tobytes(), 100 if quality == UNKNOWN_QUALITY else quality

    def regions_of(self, entry_id: int) -> npt.NDArray[np.float32]:
        """The stored region embeddings of an entry, float32 (r, d) (r may be 0)."""
        regions: npt.NDArray[np.float32] = self.payload.region_vectors[
            self.payload.region_entry_ids == entry_id
        ]
        return regions


def load_blocklist(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    *,
    encoder_id: str,
    dim: int,
    own_chain: bool = False,
) -> Blocklist:
    """Decrypt the current snapshot and build its in-memory indexes.

    With no snapshot yet (no bank ever imported) the blocklist is empty. ``own_chain``: the
    newest snapshot of ``encoder_id``'s chain, not the serving one (an encoder migration's
    shadow, :mod:`moderation.banks.encoder_chains`).

    Raises:
        EncoderMismatchError: the snapshot's encoder id differs from ``encoder_id``.
        SnapshotError: the snapshot cannot be decrypted or verified (screening must not run).
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
    payload = read_payload(session, keyring, snapshots_dir, row)
    if payload.dim != dim:
        raise EncoderMismatchError(
            f"snapshot v{row.version} holds {payload.dim}-d vectors; the encoder gives {dim}-d"
        )
    hashes = payload.hashes
    active_ids = [
        *payload.entry_ids[payload.active].tolist(),
        *hashes.entry_ids[hashes.active].tolist(),
    ]
    infos = entry_infos(session, active_ids, keyring)
    exact_key = snapshot_exact_key(session, keyring, row, payload)
    return _build(row, payload, infos, version=row.version, exact_key=exact_key)


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
    hash_mask = hashes.active & hashes.has_pdq & np.isin(hashes.entry_ids, known)
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
    )
