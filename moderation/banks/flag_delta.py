"""Flag changes as delta versions: entries disabled or re-enabled, a bank switched off or on.

Such a change adds and removes no entry; only which entries are searchable differs (an entry
is searchable when it and its bank are enabled: :func:`entry_state`). When few entries flip
(at most :data:`FLAG_DELTA_MAX_FRACTION` of the chain's entries, or
:data:`FLAG_DELTA_MIN_ENTRIES`), :func:`flag_delta` writes the change as a delta on the chain
head (:mod:`moderation.banks.snapshot_delta`): its tombstones are the flipped entries and its
segment re-adds the same entries with their signals (global vector, PDQ and quality, region
rows; hash-list entries as they are), their active flag set from the database by
:func:`moderation.banks.delta_chain.write_delta`. Workers apply it in place (the tombstones
leave the indexes, the segment's active rows join them); compaction keeps an inactive
segment entry's vector, so it can be re-enabled later.

Vectors come from the newest delta segment holding the entry, else from the full version:
an active entry's from its stored index (an ``ivf_disk`` index reads the row from its row
file), an inactive one's from the payload's inactive rows (:meth:`Payload.vectors_at`). Time:
the full version and its deltas read once, every entry's flags read once from the database,
then proportional to the flipped entries; no :meth:`Payload.full_vectors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.hash_entries import HashEntries
from moderation.banks.snapshot_delta import DeltaPayload, compose, without_embeddings
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.storage.models import Bank, Entry

#: Share of a chain's entries up to which a flag change is written as a delta (a bank of 10M
#: switched off is written in full: its delta would re-add half a million entries' signals).
FLAG_DELTA_MAX_FRACTION: Final = 0.05
#: Flipped entries always written as a delta, however small the bank.
FLAG_DELTA_MIN_ENTRIES: Final = 1_000


def entry_state(session: Session) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Every entry id, sorted, and whether it is searchable (entry and its bank enabled)."""
    rows = session.execute(
        select(Entry.id, Entry.disabled, Bank.enabled)
        .join(Bank, Entry.bank_id == Bank.id)
        .order_by(Entry.id)
    ).all()
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    searchable = np.fromiter(((not r[1]) and r[2] for r in rows), np.bool_, len(rows))
    return ids, searchable


def active_mask(
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


def flag_delta(
    session: Session, base_version: int, full: Payload, deltas: Sequence[DeltaPayload]
) -> DeltaPayload | None:
    """The delta of a flag change on the chain ``full`` + ``deltas`` (oldest first) whose
    head is version ``base_version`` (see the module docstring); None when no entry flipped,
    too many did, or an entry of the chain is gone from the database: the caller then writes
    a full version.

    Raises:
        ValueError: the chain does not compose; the stored index lacks an active entry.
    """
    composed = compose(
        without_embeddings(full),
        [DeltaPayload(d.base_version, without_embeddings(d.segment), d.tombstones) for d in deltas],
    )
    ids, searchable = entry_state(session)
    chain_ids = np.concatenate([composed.entry_ids, composed.hashes.entry_ids])
    if not np.isin(chain_ids, ids).all():
        return None
    hashes = composed.hashes
    images = composed.entry_ids[active_mask(ids, searchable, composed.entry_ids) != composed.active]
    hashed = hashes.entry_ids[active_mask(ids, searchable, hashes.entry_ids) != hashes.active]
    flipped = len(images) + len(hashed)
    limit = max(FLAG_DELTA_MIN_ENTRIES, FLAG_DELTA_MAX_FRACTION * len(chain_ids))
    if not flipped or flipped > limit:
        return None
    return DeltaPayload.of_change(
        base_version,
        full.encoder_id,
        full.dim,
        added=_image_signals(composed, full, deltas, images),
        added_hashes=_hash_subset(hashes, hashed),
        tombstones=np.concatenate([images, hashed]).tolist(),
    )


def _hash_subset(hashes: HashEntries, ids: npt.NDArray[np.int64]) -> HashEntries:
    """The hash-list entries of ``ids`` with their exact hashes and vPDQ frames."""
    keep = {
        "exact": np.isin(hashes.exact_entry_ids, ids),
        "vpdq": np.isin(hashes.vpdq_entry_ids, ids),
    }
    rows = np.isin(hashes.entry_ids, ids)
    arrays = hashes.arrays_full()
    return HashEntries(**{k: v[keep.get(k.split("_")[0], rows)] for k, v in arrays.items()})


def _image_signals(
    composed: Payload, full: Payload, deltas: Sequence[DeltaPayload], ids: npt.NDArray[np.int64]
) -> list[EntrySignals]:
    """The signals of image entries ``ids`` of the chain (``composed`` without embeddings)."""
    rows = np.flatnonzero(np.isin(composed.entry_ids, ids))
    wanted = composed.entry_ids[rows]
    vectors, regions = _embeddings(full, deltas, wanted)
    return [
        EntrySignals(
            entry_id=int(eid),
            vector=vectors[i],
            pdq=composed.pdq[row].tobytes(),
            pdq_quality=int(composed.pdq_quality[row]),
            regions=regions.get(int(eid)),
        )
        for i, (row, eid) in enumerate(zip(rows.tolist(), wanted.tolist(), strict=True))
    ]


def _embeddings(
    full: Payload, deltas: Sequence[DeltaPayload], ids: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float32], dict[int, npt.NDArray[np.float32]]]:
    """Global vectors of ``ids``, float32 (k, d) in order, and their region rows by id: each
    from the newest segment holding the entry (a later delta cannot have removed it, as the
    chain holds it), else from the full version."""
    vectors = np.empty((len(ids), full.dim), np.float32)
    regions: dict[int, npt.NDArray[np.float32]] = {}
    todo = np.ones(len(ids), np.bool_)
    for source in [*(d.segment for d in reversed(deltas)), full]:
        hit = todo & np.isin(ids, source.entry_ids)
        if not hit.any():
            continue
        rows = np.flatnonzero(np.isin(source.entry_ids, ids[hit]))
        position = {eid: i for i, eid in enumerate(source.entry_ids[rows].tolist())}
        found = source.vectors_at(rows)
        vectors[hit] = found[[position[eid] for eid in ids[hit].tolist()]]
        _collect_regions(source, ids[hit], regions)
        todo &= ~hit
    return vectors, regions


def _collect_regions(
    payload: Payload, ids: npt.NDArray[np.int64], out: dict[int, npt.NDArray[np.float32]]
) -> None:
    """Add the region rows of ``ids`` in ``payload`` to ``out`` (a row file reads only them)."""
    rows = np.flatnonzero(np.isin(payload.region_entry_ids, ids))
    if not len(rows):
        return
    found = np.asarray(payload.region_vectors[rows], np.float32)
    owners = payload.region_entry_ids[rows]
    for eid in np.unique(owners).tolist():
        out[eid] = found[owners == eid]
