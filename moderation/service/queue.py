"""The screening queue's library side: submit, process, reconcile, and the worker's state.

Nothing is lost (ARCHITECTURE.md "Rules the design keeps", RELIABILITY.md Q1-Q7):

* :func:`submit_upload` stores the upload encrypted, commits its row, and only then sends the
  task (STYLE.md rule 15). A failed send leaves a committed ``queued`` row for the reconciler.
* :func:`process_upload` is idempotent by upload id. Each attempt is counted (committed) before
  screening, so a worker killed mid-screening leaves a trace; once ``max_attempts`` attempts
  have not finished, the next delivery records ``unscannable`` with reason ``poison`` instead of
  screening again (RELIABILITY.md's note on celery discussion #8969). The result, its audit
  event and its callback are written by ``record_result`` and :func:`notify_decision` in one
  transaction under the upload's row lock, so a duplicate delivery finds the result and stops.
* :func:`reconcile` (run by Celery beat) re-sends uploads left ``queued`` or ``processing``
  past a bound (a lost message, a dead worker, Redis restarted without its data) and callbacks
  whose attempt is overdue.
* :class:`WorkerState` holds one worker process's screener: the encoder loaded once and the
  current snapshot decrypted in memory; it polls the database for a new snapshot version and
  swaps the screener between tasks. A snapshot that fails to decrypt or verify leaves the worker
  without a screener: tasks are retried later, never decided on a wrong or stale blocklist.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.records import BlocklistError
from moderation.banks.snapshot import SnapshotError
from moderation.banks.versions import current_snapshot
from moderation.crypto.errors import CryptoError, DecryptionError, UnknownKeyError
from moderation.matching.screening import Screener, ScreeningResult, record_result
from moderation.media.decode import sniff_format
from moderation.service.callbacks import notify_decision, overdue_deliveries
from moderation.service.dispatch import Dispatcher
from moderation.service.metrics import (
    DECISIONS,
    END_TO_END_SECONDS,
    ENQUEUE_FAILURES,
    POISON,
    QUEUE_WAIT_SECONDS,
    RECONCILER_RESENDS,
    REDELIVERIES,
    STAGE_SECONDS,
)
from moderation.service.subjects import pseudonymize
from moderation.service.uploads import BlobMissingError, create_upload, read_upload
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, Screening, Upload, WorkerHeartbeat

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


class SubmissionError(Exception):
    """An upload was refused; ``code`` and ``status`` map to the HTTP error contract."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# --- reliability settings (Q5) ----------------------------------------------------------------


def check_reliability(effective: Mapping[str, Any]) -> list[str]:
    """Problems with a worker's effective Celery settings; empty when safe to start.

    Expected keys: ``visibility_timeout``, ``task_time_limit``, ``task_soft_time_limit``,
    ``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier``,
    ``task_serializer``, ``accept_content``. The rules come from RELIABILITY.md (Q5 and the
    known facts above its table): celery #1628 (acks_late alone acknowledges a task whose child
    was killed), and Redis redelivering any task still running after ``visibility_timeout``.
    """
    problems: list[str] = []
    visibility = effective.get("visibility_timeout")
    limit = effective.get("task_time_limit")
    soft = effective.get("task_soft_time_limit")
    if limit is None:
        problems.append("task_time_limit is unset: a hung task would hold its worker forever")
    elif visibility is not None and visibility <= limit:
        problems.append(
            f"visibility_timeout ({visibility} s) must exceed task_time_limit ({limit} s): "
            "otherwise Redis redelivers tasks that are still running"
        )
    if soft is not None and limit is not None and soft >= limit:
        problems.append(
            f"task_soft_time_limit ({soft} s) must be below task_time_limit ({limit} s)"
        )
    if not effective.get("task_acks_late"):
        problems.append("task_acks_late must be on: a crashed task would be lost")
    if not effective.get("task_reject_on_worker_lost"):
        problems.append(
            "task_reject_on_worker_lost must be on: with acks_late alone a task whose child "
            "process is SIGKILLed is acknowledged and lost (celery #1628)"
        )
    if effective.get("worker_prefetch_multiplier") != 1:
        problems.append(
            f"worker_prefetch_multiplier is {effective.get('worker_prefetch_multiplier')}, "
            "must be 1: prefetched tasks wait behind a slow one"
        )
    if effective.get("task_serializer") != "json" or set(effective.get("accept_content") or ()) != {
        "json"
    }:
        problems.append("tasks must be serialised as JSON only (no pickle)")
    return problems


# --- submit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """An accepted upload: its id, status, and whether this request created it."""

    upload_id: str
    status: str
    created: bool
    sent: bool


def idempotency_hash(key: str) -> str:
    """SHA-256 hex of an ``Idempotency-Key`` header value (the stored form)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_image_bytes(data: bytes, max_bytes: int) -> str:
    """The image format of ``data`` (by magic bytes).

    Raises:
        SubmissionError: 400 empty, 413 over ``max_bytes``, 415 not an allowed image type.
    """
    if not data:
        raise SubmissionError(400, "empty_image", "the image part is empty")
    if len(data) > max_bytes:
        raise SubmissionError(413, "too_large", f"image is over {max_bytes} bytes")
    kind = sniff_format(data[:32])
    if kind is None:
        raise SubmissionError(
            415, "unsupported_type", "not an allowed image type (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        )
    return kind


def _existing(session: Session, client_id: int, key_hash: str) -> Upload | None:
    return session.scalar(
        select(Upload).where(Upload.client_id == client_id, Upload.idempotency_key == key_hash)
    )


def _reused(existing: Upload, data: bytes) -> Submission:
    if existing.sha256 != hashlib.sha256(data).hexdigest():
        raise SubmissionError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different image",
        )
    return Submission(existing.id, existing.status, created=False, sent=False)


def submit_upload(
    runtime: Runtime,
    dispatcher: Dispatcher,
    *,
    client_id: int,
    data: bytes,
    external_id: str | None,
    subject_id: str | None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    origin: str | None = None,
) -> Submission:
    """Accept one upload from the HTTP hook: store it encrypted, commit, then send its task.

    The subject id is pseudonymised (``moderation.service.subjects``) and never stored raw. With an
    ``idempotency_key``, a repeated request returns the first upload (one row per key: the
    database's unique constraint decides races). A send that fails after the commit is logged
    and counted; the upload stays ``queued`` and the reconciler sends it (Q7).

    Raises:
        SubmissionError: 400/413/415 bad image, 422 callback URL not on the client's allowlist
            or an idempotency key reused for another image, 403 unknown or disabled client.
    """
    from moderation.service.callback_urls import url_allowed

    settings = runtime.settings
    fmt = check_image_bytes(data, settings.max_image_bytes)
    key_hash = idempotency_hash(idempotency_key) if idempotency_key else None
    created_id: str | None = None
    try:
        with transaction(runtime.sessions) as session:
            client = session.get(ApiClient, client_id)
            if client is None or client.disabled:
                raise SubmissionError(403, "forbidden", "unknown or disabled API client")
            if key_hash is not None:
                existing = _existing(session, client_id, key_hash)
                if existing is not None:
                    return _reused(existing, data)
            if callback_url and not url_allowed(callback_url, client.callback_allowlist):
                raise SubmissionError(
                    422,
                    "callback_not_allowed",
                    "callback_url does not match this client's callback allowlist",
                )
            subject_ref = pseudonymize(session, runtime.keyring, subject_id) if subject_id else None
            upload = create_upload(
                session,
                data,
                keyring=runtime.keyring,
                blobs_dir=settings.blobs_dir,
                external_id=external_id,
                subject_ref=subject_ref,
                source="api",
                client_id=client_id,
                idempotency_key=key_hash,
                callback_url=callback_url or None,
                status="queued",
            )
            created_id = upload.id
            record_event(
                session,
                actor=f"client:{client_id}",
                action="upload.receive",
                target=f"upload:{upload.id}",
                origin=origin,
                details={
                    "size_bytes": len(data),
                    "format": fmt,
                    "subject_ref": subject_ref,
                    "callback": bool(callback_url),
                },
            )
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key committed first.
        if created_id is not None:
            (settings.blobs_dir / created_id[:2] / f"{created_id}.blob").unlink(missing_ok=True)
        if key_hash is None:
            raise
        with runtime.sessions() as session:
            existing = _existing(session, client_id, key_hash)
            if existing is None:
                raise
            return _reused(existing, data)
    assert created_id is not None
    try:
        dispatcher.send_screening(created_id)
    except Exception:  # broker down: the committed row is picked up by the reconciler
        ENQUEUE_FAILURES.inc()
        logger.warning(
            "upload %s committed but its task could not be sent; the reconciler will send it",
            created_id,
            exc_info=True,
        )
        return Submission(created_id, "queued", created=True, sent=False)
    return Submission(created_id, "queued", created=True, sent=True)


def wait_for_upload(
    runtime: Runtime, upload_id: str, timeout: float, *, interval: float = 0.05
) -> str | None:
    """Poll the upload's status until ``done`` or ``timeout`` (s); returns the last status
    (None when the upload does not exist)."""
    deadline = time.monotonic() + timeout
    while True:
        with runtime.sessions() as session:
            status = session.scalar(select(Upload.status).where(Upload.id == upload_id))
        if status is None or status == "done" or time.monotonic() >= deadline:
            return status
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


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


def reload_keyring(runtime: Runtime) -> None:
    """Forget the cached key ring so the next use re-reads it (key rotation without restart)."""
    runtime.__dict__.pop("keyring", None)


def _since(value: datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (datetime.now(UTC) - value).total_seconds()


def _decrypt(runtime: Runtime, upload: Upload) -> bytes:
    try:
        return read_upload(upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir)
    except UnknownKeyError:
        # The key ring may have been rotated since this process read it: re-read it once.
        reload_keyring(runtime)
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
        QUEUE_WAIT_SECONDS.observe(max(0.0, _since(upload.received_at)))
    upload.attempts += 1
    upload.status = "processing"
    upload.updated_at = datetime.now(UTC)
    return _Claimed(upload.id, upload.received_at, upload.attempts, data, unreadable)


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
) -> ProcessResult:
    """Screen one queued upload and record its result (the ``moderation.screen`` task's body).

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

    Returns:
        The outcome for ``upload_id`` itself.

    Raises:
        RetryLater: no verified snapshot or a missing master key; nothing was counted.
        sqlalchemy.exc.SQLAlchemyError: the database failed; the task should retry.
    """
    current = screener()
    with transaction(runtime.sessions) as session:
        upload = session.get(Upload, upload_id, with_for_update=True)
        if upload is None:
            logger.info("upload %s no longer exists (erased?); nothing to do", upload_id)
            return ProcessResult(Outcome.MISSING)
        if upload.status == "done":
            return ProcessResult(Outcome.ALREADY_DONE, attempts=upload.attempts)
        if upload.attempts > 0:
            REDELIVERIES.inc()
        if upload.attempts >= max_attempts:
            POISON.inc()
            logger.error(
                "upload %s did not finish in %d attempts: recording unscannable (poison)",
                upload_id,
                upload.attempts,
            )
            result = current.screen_unscannable(
                "poison", f"{upload.attempts} screening attempts did not finish"
            )
            done = _record(session, upload, result, actor=actor)
            DECISIONS.labels(result.decision).inc()
            return ProcessResult(Outcome.POISON, done.decision, upload.attempts)
        # A redelivered upload is screened alone (see _drain).
        alone = upload.attempts > 0 or batch_size <= 1
        batch = [_claim(runtime, upload)]
        if not alone:
            batch += _drain(runtime, session, {upload_id}, batch_size - 1)
    if 1 < len(batch) < batch_size and batch_wait > 0:
        time.sleep(batch_wait)
        with transaction(runtime.sessions) as session:
            batch += _drain(runtime, session, {c.upload_id for c in batch}, batch_size - len(batch))

    with transaction(runtime.sessions) as session:
        ids = [c.upload_id for c in batch]
        # Held until the results commit (PostgreSQL): a drained upload's own task waits.
        session.scalars(select(Upload.id).where(Upload.id.in_(ids)).with_for_update()).all()
        readable = [c for c in batch if c.data is not None]
        screened = current.screen_bytes([c.data for c in readable if c.data is not None])
        results = dict(zip((c.upload_id for c in readable), screened, strict=True))
        own: ProcessResult | None = None
        for claimed in batch:
            result = results.get(claimed.upload_id) or current.screen_unscannable(
                claimed.unreadable or "blob_missing", "the stored upload cannot be read"
            )
            for stage, ms in result.timings_ms.items():
                STAGE_SECONDS.labels(stage).observe(ms / 1000.0)
            row = session.get(Upload, claimed.upload_id)
            if row is None:
                done = ProcessResult(Outcome.MISSING)
            elif session.scalar(select(Screening.id).where(Screening.upload_id == row.id)):
                done = ProcessResult(Outcome.ALREADY_DONE, attempts=row.attempts)
            else:
                done = _record(session, row, result, actor=actor)
                END_TO_END_SECONDS.observe(max(0.0, _since(claimed.received_at)))
                DECISIONS.labels(result.decision).inc()
                logger.info(
                    "upload %s: %s (attempt %d, batch of %d)",
                    claimed.upload_id,
                    result.decision,
                    claimed.attempt,
                    len(batch),
                )
            if claimed.upload_id == upload_id:
                own = done
    assert own is not None
    return own


# --- reconcile --------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    """Ids re-sent by one :func:`reconcile` run."""

    screenings: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    failed_sends: int = 0


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
    for upload_id in report.screenings:
        try:
            dispatcher.send_screening(upload_id)
            RECONCILER_RESENDS.labels("screening").inc()
        except Exception:
            report.failed_sends += 1
            logger.warning("reconciler could not re-send upload %s", upload_id, exc_info=True)
    for delivery_id in report.callbacks:
        try:
            dispatcher.send_callback(delivery_id)
            RECONCILER_RESENDS.labels("callback").inc()
        except Exception:
            report.failed_sends += 1
            logger.warning("reconciler could not re-send callback %s", delivery_id, exc_info=True)
    if report.screenings or report.callbacks:
        logger.warning(
            "reconciler re-sent %d uploads and %d callbacks",
            len(report.screenings),
            len(report.callbacks),
        )
    return report


# --- worker state -----------------------------------------------------------------------------


def worker_id() -> str:
    """``hostname:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerState:
    """One worker process's screener, kept current with the newest snapshot version.

    Args:
        runtime: this process's runtime (build it after fork).
        poll_interval: seconds between checks of the current snapshot version.
    """

    def __init__(self, runtime: Runtime, *, poll_interval: float) -> None:
        self.runtime = runtime
        self.poll_interval = poll_interval
        self.worker_id = worker_id()
        self.started_at = datetime.now(UTC)
        self._lock = threading.Lock()
        self._screener: Screener | None = None
        self._error: str | None = None
        self._loaded_at: datetime | None = None
        self._model: str | None = None
        self._checked: float = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> str | None:
        """Why this worker has no screener (None when it has one)."""
        return self._error

    @property
    def version(self) -> int | None:
        """The snapshot version in use, or None."""
        return None if self._screener is None else self._screener.blocklist.version

    def _current_state(self) -> tuple[int, str | None]:
        """(current snapshot version or 0, active classifier model version or None)."""
        from moderation.matching.classifier.model import active_model_version

        with self.runtime.sessions() as session:
            row = current_snapshot(session)
            model = (
                active_model_version(session, str(self.runtime.encoder.id))
                if self.runtime.settings.classifier
                else None
            )
            return (0 if row is None else row.version), model

    def refresh(self, *, force: bool = False) -> None:
        """Reload the screener when the current snapshot version or the active classifier
        model differs (or after an error), then write this worker's heartbeat. Never raises for
        snapshot problems: they become :attr:`error`."""
        with self._lock:
            self._checked = time.monotonic()
            try:
                version, model = self._current_state()
                if (
                    force
                    or self._screener is None
                    or version != self.version
                    or model != self._model
                ):
                    self._model = model
                    self._load()
            except Exception as exc:  # database down: keep the screener, report it
                logger.warning("snapshot check failed: %s", exc)
                self._error = self._error or f"snapshot check failed: {type(exc).__name__}"
                return
            self._heartbeat()

    def _load(self) -> None:
        try:
            try:
                blocklist = self.runtime.load_blocklist()
            except UnknownKeyError:
                reload_keyring(self.runtime)
                blocklist = self.runtime.load_blocklist()
            screener = self.runtime.screener(blocklist)
        except (SnapshotError, CryptoError, BlocklistError) as exc:
            # Fail closed: no screener at all, rather than the old (possibly stale) blocklist.
            self._screener = None
            self._error = str(exc)[:1000]
            logger.error("worker %s does not screen: %s", self.worker_id, exc)
            return
        previous = self.version
        self._screener, self._error = screener, None
        self._loaded_at = datetime.now(UTC)
        logger.info(
            "worker %s loaded snapshot v%d (%d entries; was %s)",
            self.worker_id,
            blocklist.version,
            len(blocklist),
            previous,
        )

    def _heartbeat(self) -> None:
        try:
            with transaction(self.runtime.sessions) as session:
                session.merge(
                    WorkerHeartbeat(
                        id=self.worker_id,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        encoder_id=str(self.runtime.encoder.id) if self._screener else None,
                        snapshot_version=self.version,
                        snapshot_loaded_at=self._loaded_at,
                        error=self._error,
                        started_at=self.started_at,
                        updated_at=datetime.now(UTC),
                    )
                )
        except Exception as exc:  # readiness goes stale, which is the right signal
            logger.warning("could not write worker heartbeat: %s", exc)

    def screener(self) -> Screener:
        """The current screener, re-checked at most every ``poll_interval`` seconds.

        Raises:
            SnapshotUnavailable: no verified snapshot (the message says why).
        """
        if time.monotonic() - self._checked >= self.poll_interval:
            self.refresh()
        current = self._screener
        if current is None:
            raise SnapshotUnavailable(self._error or "no snapshot loaded")
        return current

    def start_watcher(self) -> None:
        """Poll in a daemon thread, so an idle worker also reloads and keeps its heartbeat."""

        def run() -> None:
            while not self._stop.wait(self.poll_interval):
                try:
                    self.refresh()
                except Exception:  # the watcher must outlive any one failure
                    logger.exception("snapshot watcher failed")

        self._thread = threading.Thread(target=run, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()


@dataclass(frozen=True)
class WorkerReport:
    """One worker's heartbeat as readiness shows it."""

    worker_id: str
    encoder_id: str | None
    snapshot_version: int | None
    error: str | None
    seen_s_ago: float
    stale_s: float | None


def worker_reports(session: Session, *, alive_within: float) -> tuple[int, list[WorkerReport]]:
    """The current snapshot version and the workers heard from within ``alive_within`` s.

    ``stale_s`` is how long the current version has existed while the worker still runs an
    older one (0 when up to date, None without a snapshot loaded).
    """
    row = current_snapshot(session)
    current = 0 if row is None else row.version
    created = None if row is None else row.created_at
    since = datetime.now(UTC) - timedelta(seconds=alive_within)
    reports = []
    for beat in session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.updated_at >= since)
        .order_by(WorkerHeartbeat.id)
    ):
        stale: float | None
        if beat.snapshot_version is None:
            stale = None
        elif beat.snapshot_version >= current or created is None:
            stale = 0.0
        else:
            stale = max(0.0, _since(created))
        reports.append(
            WorkerReport(
                worker_id=beat.id,
                encoder_id=beat.encoder_id,
                snapshot_version=beat.snapshot_version,
                error=beat.error,
                seen_s_ago=max(0.0, _since(beat.updated_at)),
                stale_s=stale,
            )
        )
    return current, reports
