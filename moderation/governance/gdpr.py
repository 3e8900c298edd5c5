"""Erasure by data subject (GDPR Art. 17), with legal holds, receipts and deadlines.

:func:`erase_subject` removes everything the service holds about one data subject: their
uploads (blob deleted and data key destroyed, so copies in backups are unreadable:
crypto-shredding), screenings, matches, review items, labelled pairs, callback attempts, the
per-upload Redis keys of ``moderation:upload:<id>*`` and the idempotency keys
``moderation:idem:*`` whose value is one of their uploads, and the bank entries made from their
uploads (removed from the encrypted snapshot, which gets a new version every worker reloads;
older snapshot files are pruned). Finally it destroys the subject's pseudonymisation secret, so
the pseudonym left in audit events can no longer be linked to anyone while the hash chain still
verifies.

Uploads decided ``block`` in a policy category with ``legal_hold_days`` carry
``uploads.legal_hold_until``. Until then they are kept (encrypted, with their screening, matches,
review item and derived bank entries), detached from the subject, every read is audited
(:func:`read_held_upload`), and the receipt cites the exception; :func:`release_expired_holds`
erases them once the hold ends.

Resumable and idempotent: the request row (``erasure_requests``) keeps a work list (``plan``)
of upload ids, entry ids, Redis keys, blob paths and counts. Every step can be repeated: a rerun
after a crash picks the open request up by the subject's keyed lookup hash and converges; each
item is counted once. The database part is one transaction, so readers see the subject's rows
either all present or all gone. When the request is done, the lookup hash, pseudonym and work
list are cleared from its row; what remains is the signed receipt (counts only).

Raw subject ids never reach a log line, an audit event, an exception message or the database.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import CursorResult, delete, func, select, text
from sqlalchemy.orm import Session

from moderation.audit.log import record_event, sign_document, signing_key, write_checkpoint
from moderation.audit.offline import RECEIPT_TYPE
from moderation.banks.versions import prune_snapshots
from moderation.service.subjects import lookup_key
from moderation.service.uploads import read_upload
from moderation.storage.db import transaction
from moderation.storage.models import (
    CallbackAttempt,
    Entry,
    ErasureRequest,
    LabelledPair,
    Match,
    ReviewItem,
    Screening,
    Subject,
    Upload,
    new_uuid,
)

if TYPE_CHECKING:
    import redis

    from moderation.matching.policy import Policy
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

UPLOAD_KEY_PREFIX = "moderation:upload:"
"""Redis keys holding per-upload data start with this, then the upload id (pinned contract)."""
IDEMPOTENCY_KEY_PATTERN = "moderation:idem:*"
"""Redis idempotency keys (``moderation:idem:<client>:<sha256>``); their value is an upload id."""

ERASED_STORES = (
    "uploads",
    "blobs",
    "data_keys",
    "screenings",
    "matches",
    "review_items",
    "labelled_pairs",
    "callback_attempts",
    "redis_keys",
    "bank_entries",
    "subject_secrets",
)
"""The keys of a receipt's ``counts``: what was erased, per store."""

# Arbitrary constant naming the PostgreSQL advisory lock that serialises erasure bookkeeping.
_ERASURE_LOCK_KEY = 0x6D6F645F67647072  # "mod_gdpr"
_CHUNK = 500


class GdprError(Exception):
    """An erasure step could not run (e.g. Redis unreachable); rerun once fixed."""


class _Replan(Exception):
    """New uploads of the subject arrived while erasing: plan them and go round again."""


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ERASURE_LOCK_KEY})


def _secure_delete(session: Session) -> None:
    # SQLite leaves deleted rows in free pages until they are reused; secure_delete overwrites
    # them with zeros, so the subject's pseudonyms do not survive in the database file.
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("PRAGMA secure_delete=ON"))


def _truncate_sqlite_wal(runtime: Runtime) -> None:
    # The write-ahead log still holds page images from before the deletion until a checkpoint
    # resets it; TRUNCATE also shrinks the file to zero bytes (best effort: readers may block it).
    engine = runtime.engine
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        busy = cursor.fetchone()
        cursor.close()
    finally:
        raw.close()
    if busy and busy[0]:
        logger.warning(
            "SQLite WAL checkpoint after erasure was blocked by readers; it will run later"
        )


def is_held(upload: Upload, now: datetime | None = None) -> bool:
    """True while ``upload`` is under legal hold."""
    until = upload.legal_hold_until
    return until is not None and _utc(until) > (now or _now())


# --- Redis ----------------------------------------------------------------------------------


def _redis(runtime: Runtime) -> redis.Redis | None:
    url = runtime.settings.effective_redis_url
    if not url:
        return None
    import redis as redis_lib

    return redis_lib.Redis.from_url(
        url, decode_responses=True, socket_timeout=30, socket_connect_timeout=10
    )


def _redis_keys_for(client: redis.Redis, upload_ids: set[str]) -> list[str]:
    """Every Redis key holding data of these uploads (one SCAN per key family)."""
    if not upload_ids:
        return []
    found: list[str] = []
    prefix_len = len(UPLOAD_KEY_PREFIX)
    for key in client.scan_iter(match=f"{UPLOAD_KEY_PREFIX}*", count=1000):
        rest = str(key)[prefix_len:]
        if rest.split(":", 1)[0] in upload_ids:
            found.append(str(key))
    idem = [str(key) for key in client.scan_iter(match=IDEMPOTENCY_KEY_PATTERN, count=1000)]
    for chunk in _chunks(idem):
        values = client.mget(list(chunk))
        found.extend(k for k, v in zip(chunk, values, strict=True) if v in upload_ids)
    return found


def _redis_error(runtime: Runtime, exc: Exception) -> GdprError:
    url = runtime.settings.effective_redis_url or ""
    where = url.rsplit("@", 1)[-1]  # never print a password
    return GdprError(f"Redis at {where} failed during erasure ({exc}); rerun the erasure")


# --- counting -------------------------------------------------------------------------------


def _store_counts(session: Session, upload_ids: Sequence[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for chunk in _chunks(upload_ids):
        screening_ids = select(Screening.id).where(Screening.upload_id.in_(chunk))
        counts["uploads"] += (
            session.scalar(select(func.count()).select_from(Upload).where(Upload.id.in_(chunk)))
            or 0
        )
        counts["blobs"] += (
            session.scalar(
                select(func.count())
                .select_from(Upload)
                .where(Upload.id.in_(chunk), Upload.blob_ref.is_not(None))
            )
            or 0
        )
        counts["data_keys"] += (
            session.scalar(
                select(func.count())
                .select_from(Upload)
                .where(Upload.id.in_(chunk), Upload.wrapped_key.is_not(None))
            )
            or 0
        )
        for name, model in (
            ("screenings", Screening),
            ("review_items", ReviewItem),
            ("labelled_pairs", LabelledPair),
            ("callback_attempts", CallbackAttempt),
        ):
            counts[name] += (
                session.scalar(
                    select(func.count()).select_from(model).where(model.upload_id.in_(chunk))
                )
                or 0
            )
        counts["matches"] += (
            session.scalar(
                select(func.count()).select_from(Match).where(Match.screening_id.in_(screening_ids))
            )
            or 0
        )
        counts["bank_entries"] += (
            session.scalar(
                select(func.count()).select_from(Entry).where(Entry.upload_id.in_(chunk))
            )
            or 0
        )
    return counts


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(ERASED_STORES, 0)


def _open_request(session: Session, lookup: str) -> ErasureRequest | None:
    return session.scalar(
        select(ErasureRequest)
        .where(ErasureRequest.lookup == lookup, ErasureRequest.state != "done")
        .order_by(ErasureRequest.received_at)
    )


def preview_erasure(runtime: Runtime, subject_id: str) -> dict[str, int]:
    """What :func:`erase_subject` would erase now, per store, plus ``held_uploads``.

    Reads only (the session is rolled back). Redis keys are counted when Redis is configured.

    Raises:
        ValueError: empty subject id.
        GdprError: Redis is configured but unreachable.
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    counts = _zero_counts()
    with runtime.sessions() as session:
        lookup = lookup_key(session, runtime.keyring, subject_id)
        subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
        erase: list[str] = []
        held: list[str] = []
        if subject is not None:
            now = _now()
            for upload in session.scalars(select(Upload).where(Upload.subject_ref == subject.ref)):
                (held if is_held(upload, now) else erase).append(upload.id)
            counts.update(_store_counts(session, erase))
            held_counts = _store_counts(session, held)
            for name in ("labelled_pairs", "callback_attempts"):  # erased for held uploads too
                counts[name] += held_counts[name]
            counts["subject_secrets"] = 1
        counts["held_uploads"] = len(held)
        session.rollback()
    client = _redis(runtime)
    if client is not None and (erase or held):
        try:
            counts["redis_keys"] = len(_redis_keys_for(client, {*erase, *held}))
        except Exception as exc:
            raise _redis_error(runtime, exc) from exc
        finally:
            client.close()
    return counts


# --- requests and deadlines -----------------------------------------------------------------


def _empty_plan() -> dict[str, Any]:
    return {
        "erase": [],
        "held": [],
        "entries": [],
        "redis_keys": [],
        "blobs": [],
        "counts": _zero_counts(),
        "held_kept": {},
        "exceptions": [],
        "subject_known": False,
        "snapshot_version": None,
    }


def _new_request(
    session: Session, lookup: str, subject: Subject | None, *, actor: str, state: str
) -> ErasureRequest:
    request = ErasureRequest(
        id=new_uuid(),
        subject_ref=subject.ref if subject else "",
        requested_by=actor,
        lookup=lookup,
        state=state,
        receipt={},
        plan=_empty_plan(),
    )
    session.add(request)
    session.flush()
    record_event(
        session,
        actor=actor,
        action="gdpr.request",
        target=f"erasure:{request.id}",
        details={"subject_ref": subject.ref if subject else None},
    )
    logger.info("erasure request %s registered", request.id)
    return request


def register_request(runtime: Runtime, subject_id: str, *, actor: str) -> str:
    """Record that an erasure request was received (its deadline starts now); returns its id.

    Idempotent: an open request for the same subject is returned instead of a new one.

    Raises:
        ValueError: empty subject id.
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    with transaction(runtime.sessions) as session:
        _lock(session)
        lookup = lookup_key(session, runtime.keyring, subject_id)
        request = _open_request(session, lookup)
        if request is None:
            subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
            request = _new_request(session, lookup, subject, actor=actor, state="pending")
        return request.id


def overdue_requests(session: Session, days: int = 25) -> list[dict[str, Any]]:
    """Open erasure requests received more than ``days`` ago, oldest first (for the dashboard).

    GDPR Art. 12(3) allows one month; the default leaves a few days' margin. Each item:
    ``id``, ``state``, ``received_at`` (ISO 8601), ``age_days``, ``requested_by``.
    """
    now = _now()
    rows = session.scalars(
        select(ErasureRequest)
        .where(ErasureRequest.state != "done", ErasureRequest.received_at < now - timedelta(days))
        .order_by(ErasureRequest.received_at)
    )
    return [
        {
            "id": r.id,
            "state": r.state,
            "received_at": _utc(r.received_at).isoformat(),
            "age_days": (now - _utc(r.received_at)).days,
            "requested_by": r.requested_by,
        }
        for r in rows
    ]


def list_requests(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    """Recent erasure requests, newest first: id, state, dates and the receipt's counts."""
    rows = session.scalars(
        select(ErasureRequest).order_by(ErasureRequest.received_at.desc()).limit(limit)
    )
    return [
        {
            "id": r.id,
            "state": r.state,
            "received_at": _utc(r.received_at).isoformat(),
            "completed_at": _utc(r.completed_at).isoformat() if r.completed_at else None,
            "requested_by": r.requested_by,
            "counts": r.receipt.get("counts") if r.receipt else None,
        }
        for r in rows
    ]


# --- erasure --------------------------------------------------------------------------------


def _hold_citation(policy: Policy, category: str | None) -> str:
    rules = policy.rules_for(category or policy.default_category)
    return rules.legal_hold_citation or f"legal hold (policy category {category})"


def _extend_plan(
    session: Session, runtime: Runtime, request: ErasureRequest, ref: str
) -> dict[str, Any]:
    """Add the subject's current uploads (and entries made from them) to the request's plan."""
    plan = dict(request.plan or _empty_plan())
    plan["subject_known"] = True
    erase, held = set(plan["erase"]), set(plan["held"])
    now = _now()
    for upload in session.scalars(select(Upload).where(Upload.subject_ref == ref)):
        if upload.id in held or upload.id in erase:
            continue
        (held if is_held(upload, now) else erase).add(upload.id)
    entries = set(plan["entries"])
    erase_list = sorted(erase)
    for chunk in _chunks(erase_list):
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
            for start in range(0, len(planned), _CHUNK)
            for eid in session.scalars(
                select(Entry.id).where(Entry.id.in_(planned[start : start + _CHUNK]))
            )
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
    # A run killed between delete_entries' commit and its pruning leaves an older snapshot
    # file (with the erased vectors) behind: prune again, it is idempotent.
    with transaction(runtime.sessions) as session:
        prune_snapshots(session, runtime.settings.snapshots_dir)


def _delete_redis_keys(runtime: Runtime, request_id: str) -> None:
    client = _redis(runtime)
    if client is None:
        return
    with runtime.sessions() as session:
        request = session.get(ErasureRequest, request_id)
        assert request is not None and request.plan is not None
        ids = {*request.plan["erase"], *request.plan["held"]}
        planned = list(request.plan["redis_keys"])
    try:
        found = _redis_keys_for(client, ids)
        keys = sorted({*planned, *found})
        if len(keys) != len(planned):
            # Record the keys before deleting them: a rerun then still counts them once.
            with transaction(runtime.sessions) as session:
                request = session.get(ErasureRequest, request_id)
                assert request is not None and request.plan is not None
                request.plan = {**request.plan, "redis_keys": keys}
        for chunk in _chunks(keys):
            client.delete(*chunk)
    except GdprError:
        raise
    except Exception as exc:
        raise _redis_error(runtime, exc) from exc
    finally:
        client.close()


def _deleted(session: Session, statement: Any) -> int:
    """Execute a DELETE and return how many rows it removed."""
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return int(result.rowcount)


def _delete_upload_rows(
    session: Session, upload_ids: Sequence[str], counts: Counter[str]
) -> list[str]:
    """Delete the uploads and every row hanging off them; return their blob paths."""
    blobs: list[str] = []
    for chunk in _chunks(upload_ids):
        screening_ids = select(Screening.id).where(Screening.upload_id.in_(chunk))
        counts["matches"] += _deleted(
            session, delete(Match).where(Match.screening_id.in_(screening_ids))
        )
        for name, model in (
            ("callback_attempts", CallbackAttempt),
            ("labelled_pairs", LabelledPair),
            ("review_items", ReviewItem),
            ("screenings", Screening),
        ):
            counts[name] += _deleted(session, delete(model).where(model.upload_id.in_(chunk)))
        for blob_ref, wrapped in session.execute(
            select(Upload.blob_ref, Upload.wrapped_key).where(Upload.id.in_(chunk))
        ):
            if blob_ref:
                blobs.append(blob_ref)
                counts["blobs"] += 1
            counts["data_keys"] += wrapped is not None
        # Deleting the row destroys the wrapped data key: the blob is crypto-shredded here.
        counts["uploads"] += _deleted(session, delete(Upload).where(Upload.id.in_(chunk)))
    return blobs


def _erase_rows(runtime: Runtime, request_id: str) -> None:
    """The database part, in one transaction. Raises :class:`_Replan` on late uploads."""
    with transaction(runtime.sessions) as session:
        _secure_delete(session)
        _lock(session)
        request = session.get(ErasureRequest, request_id)
        assert request is not None and request.plan is not None
        plan = dict(request.plan)
        erase, held = list(plan["erase"]), list(plan["held"])
        counts: Counter[str] = Counter(plan["counts"])
        if request.lookup is not None:
            subject = session.scalar(
                select(Subject).where(Subject.lookup == request.lookup).with_for_update()
            )
            if subject is not None:
                ref = subject.ref
                # Delete first: on PostgreSQL this waits for transactions still adding uploads
                # under the pseudonym (they hold FOR SHARE on the row), so the check below sees
                # them.
                session.delete(subject)
                session.flush()
                known = {*erase, *held}
                late = [
                    uid
                    for uid in session.scalars(select(Upload.id).where(Upload.subject_ref == ref))
                    if uid not in known
                ]
                if late:
                    raise _Replan
                counts["subject_secrets"] += 1
        blobs = _delete_upload_rows(session, erase, counts)
        now = _now()
        kept: Counter[str] = Counter(plan["held_kept"])
        exceptions: dict[str, dict[str, Any]] = {e["citation"]: e for e in plan["exceptions"]}
        policy = runtime.policy
        for chunk in _chunks(held):
            for name, model in (
                ("callback_attempts", CallbackAttempt),
                ("labelled_pairs", LabelledPair),
            ):
                counts[name] += _deleted(session, delete(model).where(model.upload_id.in_(chunk)))
            for upload in session.scalars(select(Upload).where(Upload.id.in_(chunk))):
                if upload.erasure_request_id == request.id:
                    continue  # already detached by an earlier run
                category = session.scalar(
                    select(Screening.category).where(Screening.upload_id == upload.id)
                )
                citation = _hold_citation(policy, category)
                until = _utc(upload.legal_hold_until or now).isoformat()
                item = exceptions.setdefault(
                    citation,
                    {"citation": citation, "category": category, "uploads": 0, "until": until},
                )
                item["uploads"] += 1
                item["until"] = max(item["until"], until)
                kept.update(
                    {
                        k: v
                        for k, v in _store_counts(session, [upload.id]).items()
                        if k not in ("labelled_pairs", "callback_attempts")
                    }
                )
                # Kept as evidence but no longer linked to the person.
                upload.subject_ref = None
                upload.erasure_request_id = request.id
        plan.update(
            counts=dict(counts),
            blobs=sorted({*plan["blobs"], *blobs}),
            held_kept=dict(kept),
            exceptions=sorted(exceptions.values(), key=lambda e: str(e["citation"])),
        )
        request.plan = plan


def _delete_blob_files(blobs_dir: Path, blob_refs: Iterable[str], upload_ids: Iterable[str]) -> int:
    """Unlink blob files (and any derived file named after the upload, e.g. thumbnails)."""
    removed = 0
    for ref in blob_refs:
        path = blobs_dir / ref
        if path.exists():
            path.unlink()
            removed += 1
    for upload_id in upload_ids:
        folder = blobs_dir / upload_id[:2]
        if folder.is_dir():
            for path in folder.glob(f"{upload_id}*"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _finish(runtime: Runtime, request_id: str, actor: str) -> dict[str, Any]:
    with transaction(runtime.sessions) as session:
        _secure_delete(session)
        _lock(session)
        request = session.get(ErasureRequest, request_id)
        assert request is not None
        if request.state == "done":
            return dict(request.receipt)
        assert request.plan is not None
        plan = request.plan
        counts = {**_zero_counts(), **plan["counts"]}
        counts["bank_entries"] = len(plan["entries"])
        counts["redis_keys"] = len(plan["redis_keys"])
        held = {
            "uploads": len(plan["held"]),
            "kept": plan["held_kept"],
            "exceptions": plan["exceptions"],
        }
        completed = _now()
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
            "received_at": _utc(request.received_at).isoformat(),
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


def erase_subject(
    runtime: Runtime, subject_id: str, *, actor: str, dry_run: bool = False
) -> dict[str, Any]:
    """Erase everything held about one data subject; return the signed JSON receipt.

    Steps (each repeatable; see the module docstring): open or resume the request and plan;
    remove bank entries made from the subject's uploads (new snapshot, old ones pruned); delete
    their Redis keys; in one transaction delete their rows, destroy their uploads' data keys,
    detach held uploads and destroy the subject secret; delete the blob files; sign and store
    the receipt, audit it (``gdpr.erase``) and checkpoint the audit chain.

    Receipt fields: ``type`` (``moderation-erasure-receipt/1``), ``request_id``, ``dry_run``,
    ``received_at``, ``completed_at``, ``requested_by``, ``executed_by``, ``subject_known``,
    ``counts`` (:data:`ERASED_STORES`), ``held`` (``uploads``, ``kept`` per store,
    ``exceptions``: citation, category, uploads, until), ``snapshot_version``, ``audit_seq``,
    ``public_key``, ``signature`` (Ed25519; check with ``moderation audit verify-receipt`` or
    :mod:`moderation.audit.offline`). A dry run returns the preview counts (and
    ``held_uploads``), signed, and changes nothing.

    Raises:
        ValueError: empty subject id.
        GdprError: Redis is configured but failed (rerun to finish).
        moderation.banks.snapshot.SnapshotError: the current snapshot cannot be read
            (bank entries cannot be removed; nothing else was changed yet).
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    with transaction(runtime.sessions) as session:
        key = signing_key(session, runtime.keyring, create=True, actor=actor)
    if dry_run:
        counts = preview_erasure(runtime, subject_id)
        return sign_document(
            {
                "type": RECEIPT_TYPE,
                "request_id": None,
                "dry_run": True,
                "generated_at": _now().isoformat(),
                "requested_by": actor,
                "counts": counts,
            },
            key,
        )
    while True:
        with transaction(runtime.sessions) as session:
            _lock(session)
            lookup = lookup_key(session, runtime.keyring, subject_id)
            request = _open_request(session, lookup)
            subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
            if request is None:
                request = _new_request(session, lookup, subject, actor=actor, state="running")
            request.state = "running"
            if subject is not None:
                _extend_plan(session, runtime, request, subject.ref)
            request_id = request.id
        _delete_bank_entries(runtime, request_id, actor)
        _delete_redis_keys(runtime, request_id)
        try:
            _erase_rows(runtime, request_id)
        except _Replan:
            logger.info("erasure %s: new uploads arrived meanwhile; planning again", request_id)
            continue
        break
    with runtime.sessions() as session:
        request = session.get(ErasureRequest, request_id)
        assert request is not None
        if request.plan is not None:
            _delete_blob_files(
                runtime.settings.blobs_dir, request.plan["blobs"], request.plan["erase"]
            )
    receipt = _finish(runtime, request_id, actor)
    _truncate_sqlite_wal(runtime)
    return receipt


# --- legal holds ----------------------------------------------------------------------------


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
            "legal_hold_until": _utc(until).isoformat() if until else None,
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
        moderation.service.uploads.BlobMissingError, moderation.crypto.errors.CryptoError:
            unreadable.
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
                "legal_hold_until": _utc(upload.legal_hold_until).isoformat()
                if upload.legal_hold_until
                else None,
            },
        )
        return read_upload(upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir)


def release_expired_holds(
    runtime: Runtime, *, actor: str, now: datetime | None = None
) -> dict[str, int]:
    """Erase held uploads of erased subjects whose legal hold has ended; returns counts.

    Order: bank entries made from them, Redis keys, blob files, then the rows (so a rerun after
    a crash still finds every upload). Audited as ``gdpr.hold_release``.

    Raises:
        GdprError: Redis is configured but failed.
    """
    from moderation.banks.operations import delete_entries

    moment = now or _now()
    with runtime.sessions() as session:
        ids = list(
            session.scalars(
                select(Upload.id).where(
                    Upload.erasure_request_id.is_not(None), Upload.legal_hold_until <= moment
                )
            )
        )
        entries = [
            int(e)
            for chunk in _chunks(ids)
            for e in session.scalars(select(Entry.id).where(Entry.upload_id.in_(chunk)))
        ]
    counts = _zero_counts()
    if not ids:
        return counts
    if entries:
        delete_entries(runtime, entries, actor=actor)
        counts["bank_entries"] = len(entries)
    client = _redis(runtime)
    if client is not None:
        try:
            keys = _redis_keys_for(client, set(ids))
            for chunk in _chunks(keys):
                client.delete(*chunk)
            counts["redis_keys"] = len(keys)
        except Exception as exc:
            raise _redis_error(runtime, exc) from exc
        finally:
            client.close()
    with runtime.sessions() as session:
        refs = [
            ref
            for chunk in _chunks(ids)
            for ref in session.scalars(select(Upload.blob_ref).where(Upload.id.in_(chunk)))
            if ref
        ]
    _delete_blob_files(runtime.settings.blobs_dir, refs, ids)
    with transaction(runtime.sessions) as session:
        _secure_delete(session)
        tally: Counter[str] = Counter()
        _delete_upload_rows(session, ids, tally)
        counts.update(tally)
        record_event(
            session,
            actor=actor,
            action="gdpr.hold_release",
            target=f"uploads:{len(ids)}",
            details={"counts": counts},
        )
    _truncate_sqlite_wal(runtime)
    logger.info("released %d uploads whose legal hold ended", len(ids))
    return counts
