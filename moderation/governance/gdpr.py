"""Erasure by data subject (GDPR Art. 17): the plan, the erasure itself and its receipt.

:func:`erase_subject` removes everything the service holds about one data subject: their
uploads (blob deleted and data key destroyed, so copies in backups are unreadable:
crypto-shredding), screenings, matches, review items, labelled pairs, callback attempts and
deliveries, and the bank entries made from their uploads (removed from the encrypted snapshot,
which gets a new version every worker reloads; older snapshot files are pruned). Finally it
destroys the subject's pseudonymisation secret, so the pseudonym left in audit events can no
longer be linked to anyone while the hash chain still verifies.

Uploads under legal hold (:mod:`moderation.governance.holds`) are kept, detached from the
subject, and the receipt cites the exception. The per-store steps live in
:mod:`moderation.governance.erasure_stores`; the request rows and deadlines in
:mod:`moderation.governance.erasure_requests`.

Resumable and idempotent: the request row (``erasure_requests``) keeps a work list (``plan``)
of upload ids, entry ids, blob paths and counts. Every step can be repeated: a rerun
after a crash picks the open request up by the subject's keyed lookup hash and converges; each
item is counted once. The database part is one transaction, so readers see the subject's rows
either all present or all gone. When the request is done, the lookup hash, pseudonym and work
list are cleared from its row; what remains is the signed receipt (counts only).

Raw subject ids never reach a log line, an audit event, an exception message or the database.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event, sign_document, signing_key, write_checkpoint
from moderation.audit.offline import RECEIPT_TYPE
from moderation.banks.compaction import compact_snapshots
from moderation.banks.retention import prune_snapshots
from moderation.governance.erasure_requests import empty_plan, new_request, open_request
from moderation.governance.erasure_stores import (
    as_utc,
    chunks,
    delete_blob_files,
    delete_link_rows,
    delete_upload_rows,
    erasure_lock,
    now_utc,
    secure_delete,
    store_counts,
    truncate_sqlite_wal,
    zero_counts,
)
from moderation.governance.holds import hold_citation, is_held
from moderation.governance.legal_holds import held_items
from moderation.service.subjects import lookup_key
from moderation.storage.db import transaction
from moderation.storage.models import (
    Entry,
    ErasureRequest,
    Screening,
    Subject,
    Upload,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from moderation.matching.policy import Policy
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


class _Replan(Exception):
    """New uploads of the subject arrived while erasing: plan them and go round again."""


def preview_erasure(runtime: Runtime, subject_id: str) -> dict[str, int]:
    """What :func:`erase_subject` would erase now, per store, plus ``held_uploads``.

    Reads only (the session is rolled back). Nothing is read from Redis: the service keeps no
    per-upload data there (Celery messages carry upload ids only until a worker takes them;
    results are not stored).

    Raises:
        ValueError: empty subject id.
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    counts = zero_counts()
    with runtime.sessions() as session:
        lookup = lookup_key(session, runtime.keyring, subject_id)
        subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
        erase: list[str] = []
        held: list[str] = []
        if subject is not None:
            now = now_utc()
            for upload in session.scalars(select(Upload).where(Upload.subject_ref == subject.ref)):
                (held if is_held(upload, now) else erase).append(upload.id)
            counts.update(store_counts(session, erase))
            held_counts = store_counts(session, held)
            for name in ("labelled_pairs", "callback_attempts"):  # erased for held uploads too
                counts[name] += held_counts[name]
            counts["subject_secrets"] = 1
        counts["held_uploads"] = len(held)
        session.rollback()
    return counts


# --- erasure --------------------------------------------------------------------------------


def _extend_plan(
    session: Session, runtime: Runtime, request: ErasureRequest, ref: str
) -> dict[str, Any]:
    """Add the subject's current uploads (and entries made from them) to the request's plan."""
    plan = dict(request.plan or empty_plan())
    plan["subject_known"] = True
    erase, held = set(plan["erase"]), set(plan["held"])
    now = now_utc()
    for upload in session.scalars(select(Upload).where(Upload.subject_ref == ref)):
        if upload.id in held or upload.id in erase:
            continue
        (held if is_held(upload, now) else erase).add(upload.id)
    entries = set(plan["entries"])
    erase_list = sorted(erase)
    for chunk in chunks(erase_list):
        entries.update(session.scalars(select(Entry.id).where(Entry.upload_id.in_(chunk))))
    plan.update(erase=erase_list, held=sorted(held), entries=sorted(entries))
    request.plan = plan
    return plan


def _delete_bank_entries(runtime: Runtime, request_id: str, actor: str) -> None:
    from moderation.banks.operations import delete_entries

    with runtime.sessions() as session:
        request = session.get(ErasureRequest, request_id)
        assert request is not None and request.plan is not None
        planned = [int(eid) for eid in request.plan["entries"]]
        remaining = [
            int(eid)
            for chunk in chunks(planned)
            for eid in session.scalars(select(Entry.id).where(Entry.id.in_(chunk)))
        ]
    if remaining:
        version = delete_entries(runtime, remaining, actor=actor)
        with transaction(runtime.sessions) as session:
            request = session.get(ErasureRequest, request_id)
            assert request is not None and request.plan is not None
            request.plan = {**request.plan, "snapshot_version": version}
        logger.info(
            "erasure %s: %d bank entries removed (snapshot v%d)",
            request_id,
            len(remaining),
            version,
        )
    # delete_entries wrote a delta, whose chain's full version still holds the erased
    # signals: write a full version without them now (compaction prunes the old chain). A run
    # killed before this leaves the chain behind: compacting and pruning again is idempotent.
    compact_snapshots(runtime, force=True, erasure=True)
    with transaction(runtime.sessions) as session:
        prune_snapshots(session, runtime.settings.snapshots_dir)


def _destroy_subject(session: Session, request: ErasureRequest, known: set[str]) -> int:
    """Delete the subject row (their pseudonymisation secret); 1 if it was there, else 0.

    Raises :class:`_Replan` when uploads outside ``known`` arrived under the pseudonym.
    """
    if request.lookup is None:
        return 0
    subject = session.scalar(
        select(Subject).where(Subject.lookup == request.lookup).with_for_update()
    )
    if subject is None:
        return 0
    ref = subject.ref
    # Delete first: on PostgreSQL this waits for transactions still adding uploads
    # under the pseudonym (they hold FOR SHARE on the row), so the check below sees
    # them.
    session.delete(subject)
    session.flush()
    late = [
        uid
        for uid in session.scalars(select(Upload.id).where(Upload.subject_ref == ref))
        if uid not in known
    ]
    if late:
        raise _Replan
    return 1


def _keep_as_evidence(
    session: Session,
    policy: Policy,
    request: ErasureRequest,
    upload: Upload,
    kept: Counter[str],
    exceptions: dict[str, dict[str, Any]],
) -> None:
    """Detach one held upload from its subject; tally what it keeps and the hold it falls under."""
    category = session.scalar(select(Screening.category).where(Screening.upload_id == upload.id))
    citation = hold_citation(policy, category)
    until = as_utc(upload.legal_hold_until or now_utc()).isoformat()
    item = exceptions.setdefault(
        citation,
        {"citation": citation, "category": category, "uploads": 0, "until": until},
    )
    item["uploads"] += 1
    item["until"] = max(item["until"], until)
    kept.update(
        {
            k: v
            for k, v in store_counts(session, [upload.id]).items()
            if k not in ("labelled_pairs", "callback_attempts")
        }
    )
    # Kept as evidence but no longer linked to the person.
    upload.subject_ref = None
    upload.erasure_request_id = request.id


def _detach_held_uploads(
    session: Session, policy: Policy, request: ErasureRequest, counts: Counter[str]
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Keep the planned held uploads, unlinked; return ``held_kept`` and ``exceptions``.

    Their callback attempts and labelled pairs are deleted all the same (tallied in ``counts``).
    """
    assert request.plan is not None
    kept: Counter[str] = Counter(request.plan["held_kept"])
    exceptions: dict[str, dict[str, Any]] = {e["citation"]: e for e in request.plan["exceptions"]}
    for chunk in chunks(list(request.plan["held"])):
        delete_link_rows(session, chunk, counts)
        for upload in session.scalars(select(Upload).where(Upload.id.in_(chunk))):
            if upload.erasure_request_id == request.id:
                continue  # already detached by an earlier run
            _keep_as_evidence(session, policy, request, upload, kept, exceptions)
    return dict(kept), sorted(exceptions.values(), key=lambda e: str(e["citation"]))


def _erase_rows(runtime: Runtime, request_id: str) -> None:
    """The database part, in one transaction. Raises :class:`_Replan` on late uploads."""
    with transaction(runtime.sessions) as session:
        secure_delete(session)
        erasure_lock(session)
        request = session.get(ErasureRequest, request_id)
        assert request is not None and request.plan is not None
        plan = dict(request.plan)
        erase, held = list(plan["erase"]), list(plan["held"])
        counts: Counter[str] = Counter(plan["counts"])
        counts["subject_secrets"] += _destroy_subject(session, request, {*erase, *held})
        blobs = delete_upload_rows(session, erase, counts)
        held_kept, exceptions = _detach_held_uploads(session, runtime.policy, request, counts)
        plan.update(
            counts=dict(counts),
            blobs=sorted({*plan["blobs"], *blobs}),
            held_kept=held_kept,
            exceptions=exceptions,
        )
        request.plan = plan


def _finish(runtime: Runtime, request_id: str, actor: str) -> dict[str, Any]:
    with transaction(runtime.sessions) as session:
        secure_delete(session)
        erasure_lock(session)
        request = session.get(ErasureRequest, request_id)
        assert request is not None
        if request.state == "done":
            return dict(request.receipt)
        assert request.plan is not None
        plan = request.plan
        counts = {**zero_counts(), **plan["counts"]}
        counts["bank_entries"] = len(plan["entries"])
        held = {
            "uploads": len(plan["held"]),
            "kept": plan["held_kept"],
            "exceptions": plan["exceptions"],
            "items": held_items(
                session, plan["held"], {e["category"]: e["citation"] for e in plan["exceptions"]}
            ),
        }
        completed = now_utc()
        event = record_event(
            session,
            actor=actor,
            action="gdpr.erase",
            target=f"erasure:{request.id}",
            details={"counts": counts, "held": held, "snapshot_version": plan["snapshot_version"]},
        )
        receipt = {
            "type": RECEIPT_TYPE,
            "request_id": request.id,
            "dry_run": False,
            "received_at": as_utc(request.received_at).isoformat(),
            "completed_at": completed.isoformat(),
            "requested_by": request.requested_by,
            "executed_by": actor,
            "subject_known": bool(plan["subject_known"]),
            "counts": counts,
            "held": held,
            "snapshot_version": plan["snapshot_version"],
            "audit_seq": event.seq,
        }
        key = signing_key(session, runtime.keyring, create=True, actor=actor)
        signed = sign_document(receipt, key)
        request.receipt = signed
        request.state = "done"
        request.completed_at = completed
        # Nothing that could link back to the person stays on the request row.
        request.lookup = None
        request.subject_ref = ""
        request.plan = None
        write_checkpoint(session, runtime.keyring, key=key)
    logger.info("erasure %s done: %s", request_id, counts)
    return signed


def _dry_run_receipt(
    runtime: Runtime, subject_id: str, actor: str, key: Ed25519PrivateKey
) -> dict[str, Any]:
    """The signed preview an erasure dry run returns; changes nothing."""
    counts = preview_erasure(runtime, subject_id)
    return sign_document(
        {
            "type": RECEIPT_TYPE,
            "request_id": None,
            "dry_run": True,
            "generated_at": now_utc().isoformat(),
            "requested_by": actor,
            "counts": counts,
        },
        key,
    )


def _open_and_plan(runtime: Runtime, subject_id: str, actor: str) -> str:
    """Open (or resume) the subject's request, add their current uploads to its plan; its id."""
    with transaction(runtime.sessions) as session:
        erasure_lock(session)
        lookup = lookup_key(session, runtime.keyring, subject_id)
        request = open_request(session, lookup)
        subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
        if request is None:
            request = new_request(session, lookup, subject, actor=actor, state="running")
        request.state = "running"
        if subject is not None:
            _extend_plan(session, runtime, request, subject.ref)
        return request.id


def _delete_planned_blob_files(runtime: Runtime, request_id: str) -> None:
    with runtime.sessions() as session:
        request = session.get(ErasureRequest, request_id)
        assert request is not None
        if request.plan is not None:
            delete_blob_files(
                runtime.settings.blobs_dir, request.plan["blobs"], request.plan["erase"]
            )


def erase_subject(
    runtime: Runtime, subject_id: str, *, actor: str, dry_run: bool = False
) -> dict[str, Any]:
    """Erase everything held about one data subject; return the signed JSON receipt.

    Steps (each repeatable; see the module docstring): open or resume the request and plan;
    remove bank entries made from the subject's uploads (new snapshot, old ones pruned); in one
    transaction delete their rows, destroy their uploads' data keys,
    detach held uploads and destroy the subject secret; delete the blob files; sign and store
    the receipt, audit it (``gdpr.erase``) and checkpoint the audit chain.

    Receipt fields: ``type`` (``moderation-erasure-receipt/1``), ``request_id``, ``dry_run``,
    ``received_at``, ``completed_at``, ``requested_by``, ``executed_by``, ``subject_known``,
    ``counts`` (:data:`moderation.governance.erasure_stores.ERASED_STORES`), ``held``
    (``uploads``, ``kept`` per store, ``exceptions``: citation, category, uploads, until;
    ``items``: each held upload kept back, with its category, citation and holds,
    :func:`moderation.governance.legal_holds.held_items`),
    ``snapshot_version``, ``audit_seq``, ``public_key``, ``signature`` (Ed25519; check with
    ``moderation audit verify-receipt`` or :mod:`moderation.audit.offline`). A dry run returns
    the preview counts (and ``held_uploads``), signed, and changes nothing.

    Raises:
        ValueError: empty subject id.
        moderation.banks.snapshot.SnapshotError: the current snapshot cannot be read
            (bank entries cannot be removed; nothing else was changed yet).
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    with transaction(runtime.sessions) as session:
        key = signing_key(session, runtime.keyring, create=True, actor=actor)
    if dry_run:
        return _dry_run_receipt(runtime, subject_id, actor, key)
    while True:
        request_id = _open_and_plan(runtime, subject_id, actor)
        _delete_bank_entries(runtime, request_id, actor)
        try:
            _erase_rows(runtime, request_id)
        except _Replan:
            logger.info("erasure %s: new uploads arrived meanwhile; planning again", request_id)
            continue
        break
    _delete_planned_blob_files(runtime, request_id)
    receipt = _finish(runtime, request_id, actor)
    truncate_sqlite_wal(runtime)
    return receipt
