"""Hash-list banks: export a bank's hashes as a hash list.

:func:`export_hashes` writes the bank's PDQ digests (hash-list and image entries), its vPDQ
video signatures (as python-threatexchange's ``VPDQSignal`` strings) and the exact hashes it was
given, in a ThreatExchange-compatible format
(:func:`moderation.banks.hashlists.writer.write_hash_list`), so another HMA or
python-threatexchange deployment can import them; audited. The import side is
:mod:`moderation.banks.hash_import`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.hash_entries import UNKNOWN_QUALITY, open_digest
from moderation.banks.hash_import import current_payload
from moderation.banks.hashlists.records import HashRecord
from moderation.banks.hashlists.writer import write_hash_list
from moderation.banks.import_signals import vpdq_signals
from moderation.banks.records import BlocklistError, get_bank
from moderation.banks.sealed_fields import entry_labels
from moderation.crypto.deployment import existing_deployment_secret
from moderation.signals.exact import EXACT_EXPORT_KEY_NAME, EXACT_KINDS
from moderation.storage.db import transaction
from moderation.storage.models import Entry

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime


def _export_records(
    session: Session, runtime: Runtime, bank_id: int, with_exact: bool
) -> list[HashRecord]:
    payload = current_payload(session, runtime)
    if payload is None:
        return []
    # Not dict(result): a Result has keys(), so dict() would take it for a mapping.
    ids_of_bank = session.scalars(select(Entry.id).where(Entry.bank_id == bank_id)).all()
    labels = entry_labels(session, runtime.keyring, ids_of_bank)
    ids = np.fromiter(labels, np.int64, len(labels))
    signals: dict[int, dict[str, str]] = {}
    quality: dict[int, int | None] = {}
    for row in np.flatnonzero(np.isin(payload.entry_ids, ids)):
        eid = int(payload.entry_ids[row])
        signals[eid] = {"pdq": payload.pdq[row].tobytes().hex()}
        quality[eid] = int(payload.pdq_quality[row])
    hashes = payload.hashes
    for row in np.flatnonzero(np.isin(hashes.entry_ids, ids) & hashes.has_pdq):
        eid = int(hashes.entry_ids[row])
        signals.setdefault(eid, {})["pdq"] = hashes.pdq[row].tobytes().hex()
        q = int(hashes.pdq_quality[row])
        quality[eid] = None if q == UNKNOWN_QUALITY else q
    for eid, signal in vpdq_signals(hashes, ids).items():
        signals.setdefault(eid, {})["vpdq"] = signal
    exact_rows = hashes.exact_rows(ids)
    if with_exact and len(exact_rows):
        key = existing_deployment_secret(session, runtime.keyring, EXACT_EXPORT_KEY_NAME)
        if key is None:
            raise BlocklistError("the exact-hash export key is missing: exact hashes unreadable")
        for row in exact_rows:
            kind = EXACT_KINDS[int(hashes.exact_kinds[row])]
            digest = open_digest(key, kind, bytes(hashes.exact_sealed[row]))
            signals.setdefault(int(hashes.exact_entry_ids[row]), {})[kind] = digest.hex()
    return [
        HashRecord(
            line=n,
            signals=signals[eid],
            pdq_quality=quality.get(eid),
            label=labels.get(eid, ""),
            ref=f"e_{eid}",
        )
        for n, eid in enumerate(sorted(signals), start=1)
    ]


def export_hashes(runtime: Runtime, bank_name: str, out: TextIO, *, fmt: str, actor: str) -> int:
    """Write bank ``bank_name``'s hashes to ``out`` in format ``fmt``; returns records written.

    PDQ digests of every entry (hash-list and image entries), vPDQ signatures (only the
    ``threatexchange`` and ``te-csv`` formats can carry them) and, unless ``fmt`` is ``pdq``,
    the exact hashes the bank was given (unsealed: the file is a plaintext hash list, so the
    export is an audit event naming the actor, bank, format and count).

    Raises:
        BlocklistError: unknown bank, or a missing export key.
        ValueError: a format :func:`moderation.banks.hashlists.writer.write_hash_list` cannot
            write.
    """
    with runtime.sessions() as session:
        bank = get_bank(session, bank_name)
        records = _export_records(session, runtime, bank.id, with_exact=fmt != "pdq")
    written: int = write_hash_list(records, fmt, out)
    with transaction(runtime.sessions) as session:
        record_event(
            session,
            actor=actor,
            action="bank.export_hashes",
            target=f"bank:{bank.id}",
            details={"format": fmt, "records": written},
        )
    return written
