"""A shard worker's part of the current snapshot: the cosine index of one shard's entries.

The snapshot is decrypted and verified as for any worker (:func:`moderation.banks.versions.
read_payload`, fail closed); the shard's entries (active, still in the database, and
``shard_of_ids(id) == shard``) are indexed and everything else (other shards' vectors, PDQ,
region embeddings, entry metadata) is dropped, so a shard worker's resident memory is the
shard's index, about 1/S of the bank's, once loading is over. No encoder is loaded: the
snapshot's encoder id travels with its version, which the screening side checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from moderation.banks.index import CosineIndex
from moderation.banks.records import entry_infos
from moderation.banks.shards import shard_of_ids
from moderation.banks.snapshot import SnapshotError
from moderation.banks.versions import current_snapshot, read_payload
from moderation.crypto.keys import KeyRing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardIndex:
    """One shard of one snapshot version: its cosine index (None: no entry in this shard or
    no snapshot yet) and the snapshot it came from."""

    shard: int
    shards: int
    snapshot_id: str | None
    version: int
    index: CosineIndex | None

    def __len__(self) -> int:
        """Entries in this shard."""
        return 0 if self.index is None else len(self.index)


def current_snapshot_id(session: Session) -> str | None:
    """The serving chain's newest snapshot id (None before the first import): cheap to poll."""
    row = current_snapshot(session)
    return None if row is None else row.snapshot_id


def load_shard(
    session: Session, keyring: KeyRing, snapshots_dir: Path, *, shard: int, shards: int
) -> ShardIndex:
    """Decrypt the serving chain's current snapshot and index shard ``shard`` of ``shards``.

    Raises:
        SnapshotError: the snapshot cannot be decrypted, verified or decoded.
        ValueError: ``shard`` is not in ``[0, shards)``.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    row = current_snapshot(session)
    if row is None:
        return ShardIndex(shard, shards, None, 0, None)
    payload = read_payload(session, keyring, snapshots_dir, row)
    active = payload.entry_ids[payload.active]
    known = np.fromiter(entry_infos(session, active.tolist()), np.int64)
    mask = payload.active & np.isin(payload.entry_ids, known)
    mask &= shard_of_ids(payload.entry_ids, shards) == shard
    try:
        vectors = payload.full_vectors()[mask]
    except ValueError as exc:
        raise SnapshotError(f"the snapshot's vectors cannot be decoded: {exc}") from exc
    ids = payload.entry_ids[mask]
    index = CosineIndex.build(ids, vectors) if ids.size else None
    logger.info(
        "shard %d/%d: %d of %d entries from snapshot v%d",
        shard,
        shards,
        ids.size,
        int(payload.active.sum()),
        row.version,
    )
    return ShardIndex(shard, shards, row.snapshot_id, row.version, index)
