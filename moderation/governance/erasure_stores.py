"""The per-store primitives that erasure and legal-hold release share.

Owns the receipt's store names (:data:`ERASED_STORES`), :class:`GdprError`, and the steps that
count or delete one set of uploads in every store: database rows (:func:`store_counts`,
:func:`delete_upload_rows`), blob files (:func:`delete_blob_files`), plus the locking and SQLite
scrubbing around them. Nothing per-upload lives in Redis (Celery keeps no results there), so
there is no Redis step. :mod:`moderation.governance.gdpr` (erasure by data subject) and
:mod:`moderation.governance.holds` (release of expired legal holds) build on these.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import CursorResult, delete, func, select, text
from sqlalchemy.orm import Session

from moderation.storage.decisions import Appeal, Decision
from moderation.storage.models import (
    CallbackAttempt,
    Entry,
    LabelledPair,
    Match,
    ReviewItem,
    Screening,
    Upload,
)

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ERASED_STORES = (
    "uploads",
    "blobs",
    "data_keys",
    "screenings",
    "matches",
    "review_items",
    "appeals",
    "decisions",
    "labelled_pairs",
    "callback_attempts",
    "bank_entries",
    "subject_secrets",
)
"""The keys of a receipt's ``counts``: what was erased, per store."""

# Arbitrary constant naming the PostgreSQL advisory lock that serialises erasure bookkeeping.
_ERASURE_LOCK_KEY = 0x6D6F645F67647072  # "mod_gdpr"
CHUNK = 500
"""Ids per ``IN (...)`` clause, to keep statements small."""


class GdprError(Exception):
    """An erasure step could not run; rerun once fixed."""


def now_utc() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as aware UTC (naive values, as SQLite returns them, are taken to be UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def chunks(items: Sequence[_T], size: int = CHUNK) -> Iterator[Sequence[_T]]:
    """Consecutive slices of ``items``, ``size`` at most each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def erasure_lock(session: Session) -> None:
    """Serialise erasure bookkeeping until the transaction ends (PostgreSQL advisory lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ERASURE_LOCK_KEY})


def secure_delete(session: Session) -> None:
    """Make SQLite overwrite deleted rows in this session (no-op on PostgreSQL)."""
    # SQLite leaves deleted rows in free pages until they are reused; secure_delete overwrites
    # them with zeros, so the subject's pseudonyms do not survive in the database file.
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("PRAGMA secure_delete=ON"))


def truncate_sqlite_wal(runtime: Runtime) -> None:
    """Checkpoint and truncate the SQLite write-ahead log after an erasure (no-op elsewhere)."""
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


def store_counts(session: Session, upload_ids: Sequence[str]) -> Counter[str]:
    """How many rows these uploads hold, per store name of :data:`ERASED_STORES`."""
    counts: Counter[str] = Counter()
    for chunk in chunks(upload_ids):
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
            ("appeals", Appeal),
            ("decisions", Decision),
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


def zero_counts() -> dict[str, int]:
    """A count of 0 for every store of :data:`ERASED_STORES`."""
    return dict.fromkeys(ERASED_STORES, 0)


def _deleted(session: Session, statement: Any) -> int:
    """Execute a DELETE and return how many rows it removed."""
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return int(result.rowcount)


def delete_link_rows(session: Session, upload_ids: Sequence[str], counts: Counter[str]) -> None:
    """Delete these uploads' callback attempts and labelled pairs, tallied in ``counts``.

    One chunk of ids at most (:data:`CHUNK`); erasure deletes these even for held uploads.
    """
    for name, model in (
        ("callback_attempts", CallbackAttempt),
        ("labelled_pairs", LabelledPair),
    ):
        counts[name] += _deleted(session, delete(model).where(model.upload_id.in_(upload_ids)))


def delete_upload_rows(
    session: Session, upload_ids: Sequence[str], counts: Counter[str]
) -> list[str]:
    """Delete the uploads and every row hanging off them; return their blob paths."""
    blobs: list[str] = []
    for chunk in chunks(upload_ids):
        screening_ids = select(Screening.id).where(Screening.upload_id.in_(chunk))
        counts["matches"] += _deleted(
            session, delete(Match).where(Match.screening_id.in_(screening_ids))
        )
        for name, model in (
            ("callback_attempts", CallbackAttempt),
            ("labelled_pairs", LabelledPair),
            ("review_items", ReviewItem),
            ("appeals", Appeal),  # before decisions: an appeal names the decision it contests
            ("decisions", Decision),
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


def delete_blob_files(blobs_dir: Path, blob_refs: Iterable[str], upload_ids: Iterable[str]) -> int:
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
