"""Compaction of a delta chain whose full version keeps row files (an ``ivf_disk`` index, and
region rows of a large bank), without decoding every vector of the bank at once.

:func:`moderation.banks.compaction.compact_chains` otherwise composes the chain
(:func:`moderation.banks.versions.read_payload`: every active entry's row read out of the row
file into one float32 array, 51 GB at 10M x 1280-d) and builds a new index, k-means and PCA
included. Here the new full version's ``ivf_disk`` index reuses the full version's trained
projection, lists' centroids and SQ8 ranges (:meth:`DiskIvf.emptied_index`), and its row file
is written chunk by chunk (:data:`STREAM_ROWS` rows at a time): the full version's surviving
rows decrypted in file order from its row file, then the deltas' added rows. Region rows are
streamed the same way into the new version's region row file. The result holds what the
composed chain holds (same entries, active masks, PDQ, hashes, float16 rows), and an index
that answers as the worker's loaded chain does (same inverted lists; positions renumbered).
Peak memory: the decrypted full version (its candidate index, about 270 bytes per entry), one
copy of that index, the deltas' segments and one chunk of rows.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from moderation.banks import versions
from moderation.banks.delta_chain import add_row, chain_of, read_deltas
from moderation.banks.rowfile import RowArray, RowFile
from moderation.banks.snapshot import SnapshotFile, snapshot_filename, write_snapshot
from moderation.banks.snapshot_delta import compose, without_embeddings
from moderation.banks.snapshot_payload import Payload
from moderation.crypto.keys import KeyRing
from moderation.storage.models import IndexSnapshot

if TYPE_CHECKING:
    from moderation.banks.index import CosineIndex

logger = logging.getLogger(__name__)

#: Rows decrypted, indexed and re-encrypted per step (160 MB of float32 at 1280-d).
STREAM_ROWS: Final = 32_768


def compact_disk_chain(
    session: Session,
    keyring: KeyRing,
    snapshots_dir: Path,
    head: IndexSnapshot,
    *,
    compacted_from: int | None,
) -> tuple[IndexSnapshot, SnapshotFile] | None:
    """Write the chain ending at delta ``head`` as the next full version by streaming (see
    the module docstring); None when its full version has no ``ivf_disk`` index (the caller
    composes the chain instead). Adds (and flushes) the row; the caller commits, or deletes
    the files on failure (the snapshot, then ``.rows`` and ``.regions`` beside it).

    Raises:
        SnapshotError: a version of the chain cannot be read.
        RowFileError: a row file cannot be read (tampered) or written.
    """
    chain = chain_of(session, head)
    base = versions.read_full(keyring, snapshots_dir, chain[0])
    if base.cosine_index is None or not base.vectors_in_index:
        return None
    stored = _stored_disk(base)
    if stored is None:
        return None
    deltas = read_deltas(keyring, snapshots_dir, chain)
    gone = np.unique(np.concatenate([np.zeros(0, np.int64), *(d.tombstones for d in deltas)]))
    segment = compose(Payload.empty(base.encoder_id, base.dim), deltas)
    kept = without_embeddings(base).without(gone.tolist())
    snapshot_id, version = uuid.uuid4().hex, versions.next_version(session)
    target = snapshots_dir / snapshot_filename(snapshot_id, version)
    rows_path = versions.rows_path_of(target)
    rows_path.unlink(missing_ok=True)  # a failed earlier attempt at this version
    index = streamed_index(
        stored,
        rows_path,
        kept.entry_ids[kept.active],
        segment.entry_ids[segment.active],
        segment.vectors[segment.active],
    )
    payload = _compacted_payload(
        base, kept, segment, gone, index, target.with_suffix(versions.REGIONS_SUFFIX)
    )
    written = write_snapshot(
        snapshots_dir,
        payload.to_bytes(),
        snapshot_id=snapshot_id,
        version=version,
        encoder_id=payload.encoder_id,
        keyring=keyring,
    )
    active = int(payload.active.sum()) + int(payload.hashes.active.sum())
    row = add_row(session, written, entry_count=active, compacted_from=compacted_from)
    logger.info(
        "streamed ivf_disk chain v%d..v%d into full v%d: %d rows, no retraining",
        chain[0].version,
        head.version,
        version,
        len(index),
    )
    return row, written


def _compacted_payload(
    base: Payload,
    kept: Payload,
    segment: Payload,
    gone: npt.NDArray[np.int64],
    index: CosineIndex,
    regions_path: Path,
) -> Payload:
    """The compacted full version's payload: ``kept`` (the base without ``gone`` and its
    embeddings) then the deltas' ``segment``, the streamed ``index`` serialized, region rows
    streamed to ``regions_path``."""
    return Payload(
        encoder_id=base.encoder_id,
        dim=base.dim,
        entry_ids=np.concatenate([kept.entry_ids, segment.entry_ids]),
        vectors=np.concatenate(
            [
                base.vectors[~np.isin(base.entry_ids[~base.active], gone)],
                segment.vectors[~segment.active],
            ]
        ),
        pdq=np.concatenate([kept.pdq, segment.pdq]),
        pdq_quality=np.concatenate([kept.pdq_quality, segment.pdq_quality]),
        active=np.concatenate([kept.active, segment.active]),
        region_entry_ids=np.concatenate([kept.region_entry_ids, segment.region_entry_ids]),
        region_vectors=_regions(base, gone, segment, regions_path),
        extra_meta=dict(base.extra_meta),
        cosine_index=index.serialize(),
        vectors_in_index=True,
        hashes=kept.hashes.with_added(segment.hashes),
    )


def _stored_disk(base: Payload) -> CosineIndex | None:
    """``base``'s stored index when it is an ``ivf_disk`` one with its row file open."""
    from moderation.banks.index import CosineIndex, load_index  # FAISS: a large bank only

    assert base.cosine_index is not None
    stored = load_index(base.cosine_index, authenticated=True, row_dir=base.row_dir)
    if isinstance(stored, CosineIndex) and stored.disk is not None and stored.disk.rows:
        return stored
    return None


def streamed_index(
    stored: CosineIndex,
    rows_path: Path,
    wanted: npt.NDArray[np.int64],
    added_ids: npt.NDArray[np.int64],
    added: npt.NDArray[np.float32],
) -> CosineIndex:
    """A new ``ivf_disk`` index trained as ``stored`` (its projection, centroids and SQ8
    ranges reused, not relearned) writing its rows to ``rows_path``: ``stored``'s entries in
    ``wanted`` (int64 ids), their float16 rows streamed from its row file
    :data:`STREAM_ROWS` at a time, then ``added_ids`` with float32 ``(m, dim)`` unit vectors
    ``added``. Raises RowFileError (a row fails authentication, or cannot be written)."""
    from moderation.banks.index import CosineIndex  # FAISS: only a large bank's compaction

    disk = stored.disk
    assert disk is not None and disk.rows is not None
    settings: dict[str, Any] = dict(stored.params)
    fresh = CosineIndex(stored.dim, **settings, row_dir=rows_path.parent, row_name=rows_path.name)
    assert fresh.disk is not None
    fresh.disk.index = disk.emptied_index()
    for start in range(0, len(disk.rows), STREAM_ROWS):
        count = min(STREAM_ROWS, len(disk.rows) - start)
        labels = disk.labels[start : start + count]
        keep = (labels >= 0) & np.isin(labels, wanted)
        if keep.any():
            fresh.add(labels[keep], disk.rows.read_range(start, count)[keep])
    fresh.add(added_ids, added)
    return fresh


def _regions(
    base: Payload, gone: npt.NDArray[np.int64], segment: Payload, path: Path
) -> npt.NDArray[np.float32] | RowArray:
    """The kept region rows of ``base`` then ``segment``'s: streamed into a new region row
    file at ``path`` when ``base`` keeps them in one, else in RAM."""
    keep = ~np.isin(base.region_entry_ids, gone)
    if not isinstance(base.region_vectors, RowArray):
        return np.concatenate([base.region_vectors[keep], segment.region_vectors])
    source = base.region_vectors.rows
    path.unlink(missing_ok=True)  # a failed earlier attempt at this version
    rows = RowFile.create(path, base.dim)
    for start in range(0, len(source), STREAM_ROWS):
        count = min(STREAM_ROWS, len(source) - start)
        chunk = keep[start : start + count]
        if chunk.any():
            rows.append(source.read_range(start, count)[chunk])
    rows.append(np.asarray(segment.region_vectors))
    rows.sync()
    return RowArray(rows)
