"""The decrypted, in-memory blocklist of one snapshot version, as workers load it.

Entry metadata lives in SQL (:mod:`moderation.banks.records`); every entry's signals
(embedding, PDQ digest, region embeddings) live only in the current encrypted snapshot
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

from moderation.banks.index import CosineIndex, HammingIndex, load_index
from moderation.banks.records import EntryInfo, entry_infos
from moderation.banks.snapshot import SnapshotError
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import EncoderMismatchError, current_snapshot, read_payload
from moderation.crypto.keys import KeyRing
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
