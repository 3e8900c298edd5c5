"""Legal holds: uploads kept as evidence after their data subject's erasure.

Uploads decided ``block`` in a policy category with ``legal_hold_days`` carry
``uploads.legal_hold_until``. Until then :func:`moderation.governance.gdpr.erase_subject` keeps
them (encrypted, with their screening, matches, review item and derived bank entries), detached
from the subject, and its receipt cites the exception (:func:`hold_citation`). This module owns
what happens to them afterwards: every read is audited (:func:`read_held_upload`), the console
lists them (:func:`held_uploads`), and :func:`release_expired_holds` erases them once the hold
ends.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from moderation.audit.log import record_event
from moderation.governance.erasure_stores import (
    GdprError,
    as_utc,
    chunks,
    delete_blob_files,
    delete_upload_rows,
    now_utc,
    secure_delete,
    truncate_sqlite_wal,
    zero_counts,
)
from moderation.service.uploads import read_upload
from moderation.storage.db import transaction
from moderation.storage.models import Entry, Screening, Upload

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from moderation.matching.policy import Policy
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


def is_held(upload: Upload, now: datetime | None = None) -> bool:
    """True while ``upload`` is under legal hold."""
    until = upload.legal_hold_until
    return until is not None and as_utc(until) > (now or now_utc())


def hold_citation(policy: Policy, category: str | None) -> str:
    """The legal basis a receipt cites for keeping uploads of ``category`` under hold."""
    rules = policy.rules_for(category or policy.default_category)
    return rules.legal_hold_citation or f"legal hold (policy category {category})"


def held_uploads(session: Session) -> list[dict[str, Any]]:
    """Uploads kept under legal hold after their subject's erasure: id, until, category."""
    rows = session.execute(
        select(Upload.id, Upload.legal_hold_until, Upload.erasure_request_id, Screening.category)
        .outerjoin(Screening, Screening.upload_id == Upload.id)
        .where(Upload.erasure_request_id.is_not(None))
        .order_by(Upload.legal_hold_until)
    )
    return [
        {
            "upload_id": uid,
            "legal_hold_until": as_utc(until).isoformat() if until else None,
            "erasure_request_id": rid,
            "category": category,
        }
        for uid, until, rid, category in rows
    ]


def read_held_upload(
    runtime: Runtime, upload_id: str, *, actor: str, reason: str, origin: str | None = None
) -> bytes:
    """Decrypt a held upload's bytes; the access is audited (``upload.read_held``) first.

    Raises:
        GdprError: no such upload, or it is not a held upload of an erased subject.
        ValueError: empty ``reason`` (every access to preserved evidence needs one).
        moderation.service.uploads.BlobMissingError: the blob is gone.
        moderation.crypto.errors.CryptoError: unreadable.
    """
    if not reason.strip():
        raise ValueError("reading preserved evidence needs a reason")
    with transaction(runtime.sessions) as session:
        upload = session.get(Upload, upload_id)
        if upload is None or upload.erasure_request_id is None:
            raise GdprError(f"upload {upload_id} is not held for an erased subject")
        record_event(
            session,
            actor=actor,
            action="upload.read_held",
            target=f"upload:{upload_id}",
            origin=origin,
            details={
                "reason": reason,
                "legal_hold_until": as_utc(upload.legal_hold_until).isoformat()
                if upload.legal_hold_until
                else None,
            },
        )
        return read_upload(upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir)


def _expired_holds(runtime: Runtime, moment: datetime) -> tuple[list[str], list[int]]:
    """Ids of held uploads whose hold ended by ``moment``, and of bank entries made from them."""
    with runtime.sessions() as session:
        ids = list(
            session.scalars(
                select(Upload.id).where(
                    Upload.erasure_request_id.is_not(None),
                    or_(Upload.legal_hold_until.is_(None), Upload.legal_hold_until <= moment),
                )
            )
        )
        entries = [
            int(e)
            for chunk in chunks(ids)
            for e in session.scalars(select(Entry.id).where(Entry.upload_id.in_(chunk)))
        ]
    return ids, entries


def _delete_held_blob_files(runtime: Runtime, ids: list[str]) -> None:
    with runtime.sessions() as session:
        refs = [
            ref
            for chunk in chunks(ids)
            for ref in session.scalars(select(Upload.blob_ref).where(Upload.id.in_(chunk)))
            if ref
        ]
    delete_blob_files(runtime.settings.blobs_dir, refs, ids)


def release_expired_holds(
    runtime: Runtime, *, actor: str, now: datetime | None = None
) -> dict[str, int]:
    """Release the holds that have ended (:func:`moderation.governance.legal_holds.expire_holds`,
    audited ``hold.expire``), then erase held uploads of erased subjects no hold keeps any more;
    returns counts per store plus ``holds_expired``. The beat task ``moderation.release_holds``
    runs this.

    Order: bank entries made from them, blob files, then the rows (so a rerun after a crash
    still finds every upload). Audited as ``gdpr.hold_release``.
    """
    from moderation.banks.operations import delete_entries
    from moderation.governance.legal_holds import expire_holds

    moment = now or now_utc()
    with transaction(runtime.sessions) as session:
        expired = expire_holds(session, actor=actor, now=moment)
    ids, entries = _expired_holds(runtime, moment)
    counts = {**zero_counts(), "holds_expired": len(expired)}
    if not ids:
        return counts
    if entries:
        delete_entries(runtime, entries, actor=actor)
        counts["bank_entries"] = len(entries)
    _delete_held_blob_files(runtime, ids)
    with transaction(runtime.sessions) as session:
        secure_delete(session)
        tally: Counter[str] = Counter()
        delete_upload_rows(session, ids, tally)
        counts.update(tally)
        record_event(
            session,
            actor=actor,
            action="gdpr.hold_release",
            target=f"uploads:{len(ids)}",
            details={"counts": counts},
        )
    truncate_sqlite_wal(runtime)
    logger.info("released %d uploads whose legal hold ended", len(ids))
    return counts
