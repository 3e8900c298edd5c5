"""The screening queue's library side: process an upload, and reconcile what was left behind.

Nothing is lost (ARCHITECTURE.md "Rules the design keeps", RELIABILITY.md Q1-Q7):

* :func:`moderation.service.submission.submit_upload` commits the upload before sending its
  task; a failed send leaves a committed ``queued`` row for the reconciler.
* :func:`process_upload` is idempotent by upload id. Each attempt is counted (committed) before
  screening, so a worker killed mid-screening leaves a trace; once ``max_attempts`` attempts
  have not finished, the next delivery records ``unscannable`` with reason ``poison`` instead of
  screening again (RELIABILITY.md's note on celery discussion #8969). The result, its audit
  event and its callback are written by ``record_result`` and :func:`notify_decision` in one
  transaction under the upload's row lock, so a duplicate delivery finds the result and stops.
* :func:`reconcile` (run by Celery beat) re-sends uploads left ``queued`` or ``processing``
  past a bound (a lost message, a dead worker, Redis restarted without its data) and callbacks
  whose attempt is overdue.
* The worker's screener (:class:`moderation.service.worker.WorkerState`) raises
  :class:`SnapshotUnavailable` when it has no verified snapshot; the task retries later. So
  does a screening whose cosine index shards do not all answer (issue 16 item 3): its attempt
  is given back and :class:`RetryLater` raised, never a decision on part of the blocklist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from moderation.banks.shards import ShardUnavailable
from moderation.crypto.errors import DecryptionError, UnknownKeyError
from moderation.matching.decision import ScreeningResult
from moderation.matching.recording import record_result
from moderation.matching.screening import Screener
from moderation.service.callbacks import notify_decision, overdue_deliveries
from moderation.service.dispatch import Dispatcher
from moderation.service.metrics import (
    DECISIONS,
    END_TO_END_SECONDS,
    POISON,
    QUEUE_WAIT_SECONDS,
    RECONCILER_RESENDS,
    REDELIVERIES,
    STAGE_SECONDS,
)
from moderation.service.shadow import Shadow, screen_shadow
from moderation.service.tenancy import client_scope
from moderation.service.uploads import BlobMissingError, read_upload
from moderation.service.worker_health import seconds_since
from moderation.storage.db import transaction
from moderation.storage.models import Screening, Upload, WorkerHeartbeat

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

TERMINAL = ("allow", "review", "block", "unscannable")


# --- errors -----------------------------------------------------------------------------------


class RetryLater(Exception):
    """The upload cannot be screened *now* (no verified snapshot, a key missing); retry later.

    Never counted as an attempt and never turned into a decision.
    """


class SnapshotUnavailable(RetryLater):
    """This worker has no verified, current snapshot (readiness reports why)."""


class KeyUnavailable(RetryLater):
    """The upload's data key is wrapped under a master key this worker does not have."""


# --- process ----------------------------------------------------------------------------------


class Outcome(StrEnum):
    """What :func:`process_upload` did."""

    DECIDED = "decided"
    ALREADY_DONE = "already_done"
    MISSING = "missing"
    POISON = "poison"


@dataclass(frozen=True)
class ProcessResult:
    """Outcome, the decision when one was recorded now, and the attempts counted so far."""

    outcome: Outcome
    decision: str | None = None
    attempts: int = 0


def _decrypt(runtime: Runtime, upload: Upload) -> bytes:
    try:
        return read_upload(upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir)
    except UnknownKeyError:
        # The key ring may have been rotated since this process read it: re-read it once.
        runtime.reload_keyring()
        try:
            return read_upload(
                upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
            )
        except UnknownKeyError as exc:
            raise KeyUnavailable(str(exc)) from exc


def _record(
    session: Session, upload: Upload, result: ScreeningResult, *, actor: str
) -> ProcessResult:
    record_result(session, upload, result, actor=actor)
    notify_decision(session, upload.id)
    return ProcessResult(Outcome.DECIDED, result.decision, upload.attempts)


@dataclass
class _Claimed:
    """One upload claimed for this attempt: its bytes, or why they cannot be read."""

    upload_id: str
    received_at: datetime
    attempt: int
    data: bytes | None = None
    unreadable: str | None = None
    client_id: int | None = None


def _claim(runtime: Runtime, upload: Upload) -> _Claimed:
    """Count an attempt on ``upload`` (locked by the caller) and read its bytes."""
    data: bytes | None
    unreadable: str | None = None
    try:
        data = _decrypt(runtime, upload)
    except BlobMissingError:
        data, unreadable = None, "blob_missing"
    except DecryptionError:
        data, unreadable = None, "blob_undecryptable"
    if upload.attempts == 0:
        QUEUE_WAIT_SECONDS.observe(max(0.0, seconds_since(upload.received_at)))
    upload.attempts += 1
    upload.status = "processing"
    upload.updated_at = datetime.now(UTC)
    return _Claimed(
        upload.id, upload.received_at, upload.attempts, data, unreadable, upload.client_id
    )


def _drain(runtime: Runtime, session: Session, exclude: set[str], limit: int) -> list[_Claimed]:
    """Claim up to ``limit`` other fresh uploads (``queued``, never attempted), oldest first.

    Rows another transaction holds are skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
    SQLite serialises writers instead). Uploads that were attempted before are never drained:
    after a crash each is retried on its own, so one poison upload cannot use up the attempts
    of the uploads that shared its batch.
    """
    if limit <= 0:
        return []
    rows = session.scalars(
        select(Upload)
        .where(Upload.status == "queued", Upload.attempts == 0, Upload.id.not_in(exclude))
        .order_by(Upload.received_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [_claim(runtime, row) for row in rows]


def process_upload(
    runtime: Runtime,
    upload_id: str,
    screener: Callable[[], Screener],
    *,
    max_attempts: int,
    actor: str = "worker",
    batch_size: int = 1,
    batch_wait: float = 0.0,
    shadow: Callable[[], Shadow | None] | None = None,
) -> ProcessResult:
    """Screen one queued upload and record its result (the ``moderation.screen`` task's body);
    returns the outcome for ``upload_id`` itself.

    With ``batch_size`` > 1 the task also screens up to ``batch_size - 1`` other fresh queued
    uploads in the same encoder batch (:func:`_drain`); when the first drain found some but not
    enough, it waits ``batch_wait`` seconds once and drains again, so an idle worker never waits.
    Acknowledgement and retries stay per upload: every drained upload keeps its own task
    message, which is acknowledged only when that task runs and finds the result recorded (or
    screens the upload itself, alone, if this batch died: each drained upload's attempt is
    committed before screening, like this task's own). The results are recorded in one
    transaction that holds the batch's row locks from before screening (PostgreSQL), so a
    drained upload's own task arriving meanwhile waits and then finds it done.

    Args:
        screener: returns the worker's current screener, or raises :class:`SnapshotUnavailable`.
        max_attempts: unfinished attempts after which the upload ends ``unscannable/poison``.
        batch_size: most uploads screened together (1: this upload alone).
        batch_wait: bounded wait for more uploads, seconds.
        shadow: returns an encoder migration's target screener while one shadows, else None;
            it screens the same batch after the serving screener decided (its decisions are
            recorded beside, never instead: :mod:`moderation.service.shadow`).

    Raises:
        RetryLater: no verified snapshot, a missing master key, or an unanswered shard.
        sqlalchemy.exc.SQLAlchemyError: the database failed; the task should retry.
    """
    current = screener()
    with transaction(runtime.sessions) as session:
        upload = session.get(Upload, upload_id, with_for_update=True)
        if upload is None:
            logger.info("upload %s no longer exists (erased?); nothing to do", upload_id)
            return ProcessResult(Outcome.MISSING)
        settled = _settled(
            runtime, session, upload, current, max_attempts=max_attempts, actor=actor
        )
        if settled is not None:
            return settled
        # A redelivered upload is screened alone (see _drain).
        alone = upload.attempts > 0 or batch_size <= 1
        batch = [_claim(runtime, upload)]
        if not alone:
            batch += _drain(runtime, session, {upload_id}, batch_size - 1)
    if 1 < len(batch) < batch_size and batch_wait > 0:
        time.sleep(batch_wait)
        with transaction(runtime.sessions) as session:
            batch += _drain(runtime, session, {c.upload_id for c in batch}, batch_size - len(batch))
    return _screen_or_give_back(
        runtime, batch, current, upload_id, actor=actor, shadow=shadow() if shadow else None
    )


def _screen_or_give_back(
    runtime: Runtime,
    batch: list[_Claimed],
    current: Screener,
    upload_id: str,
    *,
    actor: str,
    shadow: Shadow | None,
) -> ProcessResult:
    """:func:`_screen_batch`, or, when a shard of the cosine index did not answer
    (:class:`~moderation.banks.shards.ShardUnavailable`), give back the attempts counted on
    ``batch`` and raise :class:`RetryLater`: an outage of part of the index is not the uploads'
    fault, so it must not use up attempts towards ``poison``."""
    try:
        return _screen_batch(runtime, batch, current, upload_id, actor=actor, shadow=shadow)
    except ShardUnavailable as exc:
        logger.warning("upload %s not screened, retried later: %s", upload_id, exc)
        with transaction(runtime.sessions) as session:
            for claimed in batch:
                row = session.get(Upload, claimed.upload_id, with_for_update=True)
                if row is not None and row.status == "processing" and row.attempts > 0:
                    row.attempts -= 1
                    row.status = "queued" if row.attempts == 0 else "processing"
                    row.updated_at = datetime.now(UTC)
        raise RetryLater(f"cosine index shards unavailable: {exc}") from exc


def _settled(
    runtime: Runtime,
    session: Session,
    upload: Upload,
    current: Screener,
    *,
    max_attempts: int,
    actor: str,
) -> ProcessResult | None:
    """The outcome when ``upload`` (locked) is not screened again: done, or poison (recorded
    now); None when it should be screened."""
    if upload.status == "done":
        return ProcessResult(Outcome.ALREADY_DONE, attempts=upload.attempts)
    if upload.attempts > 0:
        REDELIVERIES.inc()
    if upload.attempts < max_attempts:
        return None
    POISON.inc()
    logger.error(
        "upload %s did not finish in %d attempts: recording unscannable (poison)",
        upload.id,
        upload.attempts,
    )
    result = current.screen_unscannable(
        "poison",
        f"{upload.attempts} screening attempts did not finish",
        client_scope(session, runtime, upload.client_id),
    )
    done = _record(session, upload, result, actor=actor)
    DECISIONS.labels(result.decision).inc()
    return ProcessResult(Outcome.POISON, done.decision, upload.attempts)


def _screen_batch(
    runtime: Runtime,
    batch: list[_Claimed],
    current: Screener,
    upload_id: str,
    *,
    actor: str,
    shadow: Shadow | None = None,
) -> ProcessResult:
    """Screen the claimed ``batch`` in one encoder call and record each result; returns the
    outcome for ``upload_id``."""
    with transaction(runtime.sessions) as session:
        ids = [c.upload_id for c in batch]
        # Held until the results commit (PostgreSQL): a drained upload's own task waits.
        session.scalars(select(Upload.id).where(Upload.id.in_(ids)).with_for_update()).all()
        scopes = {c.client_id: client_scope(session, runtime, c.client_id) for c in batch}
        readable = [c for c in batch if c.data is not None]
        screened = current.screen_bytes(
            [c.data for c in readable if c.data is not None],
            [scopes[c.client_id] for c in readable],
        )
        results = dict(zip((c.upload_id for c in readable), screened, strict=True))
        if shadow is not None and readable:
            ids_read = [c.upload_id for c in readable]
            data = [c.data for c in readable if c.data is not None]
            scoped = [scopes[c.client_id] for c in readable]
            screen_shadow(session, shadow, ids_read, data, screened, scoped)
        own: ProcessResult | None = None
        for claimed in batch:
            result = results.get(claimed.upload_id) or current.screen_unscannable(
                claimed.unreadable or "blob_missing",
                "the stored upload cannot be read",
                scopes[claimed.client_id],
            )
            done = _record_claimed(session, claimed, result, actor=actor, batch_len=len(batch))
            if claimed.upload_id == upload_id:
                own = done
    assert own is not None
    return own


def _record_claimed(
    session: Session, claimed: _Claimed, result: ScreeningResult, *, actor: str, batch_len: int
) -> ProcessResult:
    """Record ``result`` for one claimed upload unless it was erased or already decided."""
    for stage, ms in result.timings_ms.items():
        STAGE_SECONDS.labels(stage).observe(ms / 1000.0)
    row = session.get(Upload, claimed.upload_id)
    if row is None:
        return ProcessResult(Outcome.MISSING)
    if session.scalar(select(Screening.id).where(Screening.upload_id == row.id)):
        return ProcessResult(Outcome.ALREADY_DONE, attempts=row.attempts)
    done = _record(session, row, result, actor=actor)
    END_TO_END_SECONDS.observe(max(0.0, seconds_since(claimed.received_at)))
    DECISIONS.labels(result.decision).inc()
    logger.info(
        "upload %s: %s (attempt %d, batch of %d)",
        claimed.upload_id,
        result.decision,
        claimed.attempt,
        batch_len,
    )
    return done


# --- reconcile --------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    """Ids re-sent by one :func:`reconcile` run."""

    screenings: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    failed_sends: int = 0


def _resend(ids: list[str], send: Callable[[str], None], kind: str, noun: str) -> int:
    """Send each id's task again (``kind`` labels the metric, ``noun`` the log line); returns
    how many sends failed."""
    failed = 0
    for item_id in ids:
        try:
            send(item_id)
            RECONCILER_RESENDS.labels(kind).inc()
        except Exception:
            failed += 1
            logger.warning("reconciler could not re-send %s %s", noun, item_id, exc_info=True)
    return failed


def reconcile(
    runtime: Runtime,
    dispatcher: Dispatcher,
    *,
    stuck_after: float,
    limit: int = 1000,
) -> ReconcileReport:
    """Re-send uploads left ``queued``/``processing`` for ``stuck_after`` seconds since their
    last send or attempt, and callbacks overdue by as long (capped at 60 s).

    Each re-sent upload's ``updated_at`` is moved to now (committed before sending), so a
    backlog is re-sent once per ``stuck_after``, not on every run. Duplicates this may create
    are harmless: tasks are idempotent by id.
    """
    now = datetime.now(UTC)
    report = ReconcileReport()
    cutoff = now - timedelta(seconds=stuck_after)
    with transaction(runtime.sessions) as session:
        stuck = session.scalars(
            select(Upload)
            .where(Upload.status.in_(("queued", "processing")))
            .where(Upload.updated_at < cutoff)
            .order_by(Upload.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for upload in stuck:
            upload.updated_at = now
            report.screenings.append(upload.id)
        report.callbacks = overdue_deliveries(
            session, older_than=now - timedelta(seconds=min(stuck_after, 60.0)), limit=limit
        )
        # Heartbeats of workers gone for a day are noise in readiness reports.
        session.execute(
            delete(WorkerHeartbeat).where(WorkerHeartbeat.updated_at < now - timedelta(days=1))
        )
    report.failed_sends += _resend(
        report.screenings, dispatcher.send_screening, "screening", "upload"
    )
    report.failed_sends += _resend(
        report.callbacks, dispatcher.send_callback, "callback", "callback"
    )
    if report.screenings or report.callbacks:
        logger.warning(
            "reconciler re-sent %d uploads and %d callbacks",
            len(report.screenings),
            len(report.callbacks),
        )
    return report
