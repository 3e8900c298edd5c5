"""Which signals of an import a bank lacks, and the new entries' rows for the snapshot payload.

The import (:mod:`moderation.banks.hash_import`) merges a record into the entry that already
holds its signals: :class:`BankSignals` maps each signal in the bank (PDQ digest, keyed exact
hash, canonical vPDQ signal string) to its owner, :func:`new_signals` decides per record, and
:class:`NewEntries` gathers the kept records' signals as the array rows of
:class:`moderation.banks.hash_entries.HashEntries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from moderation.banks.hash_entries import (
    PDQ_BYTES,
    SEALED_BYTES,
    UNKNOWN_QUALITY,
    ExactSealer,
    ExactSignal,
    HashEntries,
    rows_of,
)
from moderation.banks.hashlists.records import HashRecord
from moderation.banks.snapshot_payload import Payload
from moderation.signals.exact import EXACT_KINDS, KEYED_BYTES, parse_hex
from moderation.signals.vpdq import VpdqFeature, parse_signal_str, to_signal_str

_NO_PDQ: Final = bytes(PDQ_BYTES)
_KIND_INDEX: Final = {kind: i for i, kind in enumerate(EXACT_KINDS)}
#: Signal types that are neither PDQ nor vPDQ: exact hashes, keyed and sealed.
_NOT_EXACT: Final = ("pdq", "vpdq")


@dataclass
class BankSignals:
    """The signals already in one bank -> their owner: an entry id (>= 0), or ``-(k + 1)`` for
    the k-th entry this import adds (its id is known only after the insert)."""

    pdq: dict[bytes, int] = field(default_factory=dict)
    exact: dict[tuple[str, bytes], int] = field(default_factory=dict)
    #: Canonical ``VPDQSignal`` string -> owner.
    vpdq: dict[str, int] = field(default_factory=dict)


def vpdq_signals(hashes: HashEntries, ids: npt.NDArray[np.int64]) -> dict[int, str]:
    """Entry id -> its canonical ``VPDQSignal`` string, for the vPDQ entries among ``ids``."""
    frames: dict[int, list[VpdqFeature]] = {}
    rows = np.flatnonzero(np.isin(hashes.vpdq_entry_ids, ids))
    for row in rows.tolist():
        owned = frames.setdefault(int(hashes.vpdq_entry_ids[row]), [])
        owned.append(
            VpdqFeature(
                len(owned),
                int(hashes.vpdq_quality[row]),
                hashes.vpdq_pdq[row].tobytes().hex(),
                float(hashes.vpdq_timestamps[row]),
            )
        )
    return {eid: to_signal_str(features) for eid, features in frames.items()}


def bank_signals(payload: Payload | None, ids: npt.NDArray[np.int64]) -> BankSignals:
    """The signals of the entries ``ids`` (one bank's) in ``payload`` (None: none yet)."""
    present = BankSignals()
    if payload is None:
        return present
    hashes = payload.hashes
    for digests, owners, mine in (
        (payload.pdq, payload.entry_ids, np.isin(payload.entry_ids, ids)),
        (hashes.pdq, hashes.entry_ids, np.isin(hashes.entry_ids, ids) & hashes.has_pdq),
    ):
        present.pdq.update(
            (bytes(row), eid) for row, eid in zip(digests[mine], owners[mine].tolist(), strict=True)
        )
    rows = hashes.exact_rows(ids)
    present.exact.update(
        (
            (EXACT_KINDS[int(hashes.exact_kinds[r])], bytes(hashes.exact_keyed[r])),
            int(hashes.exact_entry_ids[r]),
        )
        for r in rows
    )
    present.vpdq.update((signal, eid) for eid, signal in vpdq_signals(hashes, ids).items())
    return present


#: A record's signals the bank lacks: PDQ digest, exact signals, canonical vPDQ string.
NewSignals = tuple[bytes | None, list[ExactSignal], str | None]


def new_signals(
    record: HashRecord, present: BankSignals, sealer: ExactSealer | None, pending: int
) -> NewSignals | int:
    """The record's signals when the bank lacks one of them (the new ones are then owned by
    ``pending``), else the owner of the record's first signal.

    Raises:
        ValueError: a record without signals.
    """
    if len(record.signals) == 1 and "pdq" in record.signals:  # most lists: PDQ only
        digest = bytes.fromhex(record.signals["pdq"])
        owner = present.pdq.setdefault(digest, pending)
        return (digest, [], None) if owner == pending else owner
    pdq_hex = record.signals.get("pdq")
    pdq = bytes.fromhex(pdq_hex) if pdq_hex else None
    vpdq = record.signals.get("vpdq")
    exact = [
        sealer.signal(kind, parse_hex(kind, value))
        for kind, value in record.signals.items()
        if kind not in _NOT_EXACT and sealer is not None
    ]
    owners = [present.pdq.get(pdq)] if pdq is not None else []
    owners += [present.vpdq.get(vpdq)] if vpdq is not None else []
    owners += [present.exact.get((e.kind, e.keyed)) for e in exact]
    if not owners:
        raise ValueError(f"{record.ref}: a record without signals")
    known = [owner for owner in owners if owner is not None]
    if len(known) == len(owners):
        return known[0]
    if pdq is not None:
        present.pdq.setdefault(pdq, pending)
    if vpdq is not None:
        present.vpdq.setdefault(vpdq, pending)
    for e in exact:
        present.exact.setdefault((e.kind, e.keyed), pending)
    return pdq, exact, vpdq


def needs_sealer(records: Sequence[HashRecord]) -> bool:
    """Whether any record carries an exact hash (which must be keyed and sealed)."""
    return any(kind not in _NOT_EXACT for r in records for kind in r.signals)


class NewEntries:
    """The kept records of an import and their signals, gathered as array rows (a million
    per-entry objects would cost more than the import's database work)."""

    def __init__(self) -> None:
        self.records: list[HashRecord] = []
        self._pdq: list[bytes] = []
        self._quality: list[int] = []
        self._has_pdq: list[bool] = []
        self._exact_owner: list[int] = []
        self._exact_kind: list[int] = []
        self._keyed: list[bytes] = []
        self._sealed: list[bytes] = []
        self._vpdq_owner: list[int] = []
        self._vpdq: list[VpdqFeature] = []

    def add(self, record: HashRecord, signals: NewSignals) -> None:
        """Keep ``record`` with its new signals."""
        pdq, exact, vpdq = signals
        row = len(self.records)
        self.records.append(record)
        self._pdq.append(pdq if pdq is not None else _NO_PDQ)
        self._has_pdq.append(pdq is not None)
        quality = record.pdq_quality
        self._quality.append(UNKNOWN_QUALITY if quality is None or pdq is None else quality)
        for signal in exact:
            self._exact_owner.append(row)
            self._exact_kind.append(_KIND_INDEX[signal.kind])
            self._keyed.append(signal.keyed)
            self._sealed.append(signal.sealed)
        if vpdq is not None:
            frames = parse_signal_str(vpdq)
            self._vpdq_owner.extend([row] * len(frames))
            self._vpdq.extend(frames)

    def entries(self, ids: Sequence[int]) -> HashEntries:
        """The gathered rows as new (active) :class:`HashEntries` with entry ids ``ids``."""
        entry_ids = np.array(ids, np.int64)
        owner = np.array(self._exact_owner, np.intp)
        vpdq_owner = np.array(self._vpdq_owner, np.intp)
        frames = self._vpdq
        return HashEntries(
            entry_ids=entry_ids,
            pdq=rows_of(self._pdq, PDQ_BYTES),
            pdq_quality=np.array(self._quality, np.uint8),
            has_pdq=np.array(self._has_pdq, np.bool_),
            active=np.ones(len(entry_ids), np.bool_),
            exact_entry_ids=entry_ids[owner] if len(owner) else np.zeros(0, np.int64),
            exact_kinds=np.array(self._exact_kind, np.uint8),
            exact_keyed=rows_of(self._keyed, KEYED_BYTES),
            exact_sealed=rows_of(self._sealed, SEALED_BYTES),
            vpdq_entry_ids=entry_ids[vpdq_owner] if len(frames) else np.zeros(0, np.int64),
            vpdq_pdq=rows_of([bytes.fromhex(f.pdq_hex) for f in frames], PDQ_BYTES),
            vpdq_quality=np.array([f.quality for f in frames], np.uint8),
            vpdq_timestamps=np.array([f.timestamp for f in frames], np.float64),
        )
