"""Background jobs with progress, run by an injected runner (a thread here, Celery elsewhere).

A :class:`~moderation.storage.models.Job` row records what to do (``kind``, ``params``), how far
it got (``progress`` of ``total``) and how it ended (``state``, ``result``). Whoever creates a
job hands its id to a :class:`JobRunner`; the runner calls :func:`run_job` in some process.
:func:`run_job` is idempotent: a job that is no longer ``queued`` is left alone, so a retried or
duplicated submission does nothing.

The bank import job (``bank.import``) does the slow part (decode, embed, PDQ) outside any
database transaction, writing progress as it goes, and then adds the entries and the new
snapshot version in one short transaction (:func:`commit_with_snapshot`). On SQLite, whose
writers are serialised, a long import therefore never blocks the console's other writes.
The uploaded zip is staged in ``<data_dir>/imports`` (mode 0600) and deleted when the job ends.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit import record_event
from moderation.blocklist.importer import compute_signals, iter_sources
from moderation.blocklist.operations import commit_with_snapshot
from moderation.blocklist.service import EntrySignals, get_bank
from moderation.config import Settings
from moderation.imaging import UnscannableImage, decode_image
from moderation.storage.db import transaction
from moderation.storage.models import Entry, Job

if TYPE_CHECKING:
    from moderation.runtime import Runtime

logger = logging.getLogger(__name__)

IMPORT_KIND = "bank.import"
PROGRESS_INTERVAL_S = 0.5
"""At most one progress write per this many seconds (plus one per embedded batch)."""
MAX_REPORTED_SKIPS = 1000
"""Skipped sources listed in a job's result; the count is always complete."""
_COPY_CHUNK = 1024 * 1024


class JobError(Exception):
    """A job could not be created or run (bad archive, unknown kind, unknown bank)."""


class JobRunner(Protocol):
    """Runs a queued job somewhere: a thread, a Celery worker, or inline in tests."""

    def submit(self, job_id: str) -> None:
        """Arrange for :func:`run_job` to be called with ``job_id`` (after the caller's commit)."""


class InlineJobRunner:
    """Runs the job in the calling thread (tests, the CLI)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def submit(self, job_id: str) -> None:
        run_job(self.runtime, job_id)


class ThreadJobRunner:
    """Runs each job in a daemon thread of this process (the embedded, single-machine mode).

    A job whose process dies stays ``running``; :func:`job_view` reports it as stalled once its
    progress stops changing for ``stall_after_s``.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._threads: list[threading.Thread] = []

    def submit(self, job_id: str) -> None:
        thread = threading.Thread(
            target=run_job, args=(self.runtime, job_id), name=f"job-{job_id}", daemon=True
        )
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def join(self, timeout: float | None = None) -> None:
        """Wait for the jobs started so far (tests, shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)


def imports_dir(settings: Settings) -> Path:
    """Where uploaded archives wait for their import job (mode 0700)."""
    return settings.resolved_data_dir / "imports"


def create_import_job(
    session: Session,
    settings: Settings,
    *,
    bank_name: str,
    archive: IO[bytes],
    filename: str,
    created_by: str,
    max_bytes: int,
) -> Job:
    """Stage a zip archive and add a queued ``bank.import`` job for it (audited ``job.create``).

    Args:
        archive: the uploaded file, read in chunks.
        filename: the client's name for it (untrusted: display only).
        max_bytes: refuse archives larger than this, bytes.

    Raises:
        BlocklistError: unknown bank.
        JobError: the upload is not a zip archive or is too large.
    """
    bank = get_bank(session, bank_name)
    job = Job(
        kind=IMPORT_KIND,
        state="queued",
        params={"bank": bank.name, "filename": filename[:200]},
        created_by=created_by,
    )
    session.add(job)
    session.flush()
    directory = imports_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{job.id}.zip"
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := archive.read(_COPY_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise JobError(f"the archive is larger than {max_bytes} bytes")
                out.write(chunk)
        if not zipfile.is_zipfile(path):
            raise JobError("the upload is not a zip archive")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    job.params = {**job.params, "archive": path.name, "size_bytes": written}
    record_event(
        session,
        actor=created_by,
        action="job.create",
        target=f"job:{job.id}",
        details={"kind": IMPORT_KIND, "bank_id": bank.id, "size_bytes": written},
    )
    return job


def _set(runtime: Runtime, job_id: str, **values: Any) -> None:
    with transaction(runtime.sessions) as session:
        job = session.get(Job, job_id)
        if job is not None:
            for key, value in values.items():
                setattr(job, key, value)


def run_job(runtime: Runtime, job_id: str) -> None:
    """Run a queued job to ``done`` or ``failed``; a job in any other state is left alone."""
    with transaction(runtime.sessions) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state != "queued":
            logger.info("job %s is not queued; nothing to do", job_id)
            return
        job.state = "running"
        kind, params, actor = job.kind, dict(job.params), job.created_by
    try:
        if kind != IMPORT_KIND:
            raise JobError(f"unknown job kind {kind!r}")
        result = _run_import(runtime, job_id, params, actor)
    except Exception as exc:  # any failure ends the job, with its message
        logger.exception("job %s (%s) failed", job_id, kind)
        _set(
            runtime, job_id, state="failed", result={"error": f"{type(exc).__name__}: {exc}"[:1000]}
        )
    else:
        _set(runtime, job_id, state="done", result=result)
    finally:
        archive = params.get("archive")
        if archive:
            (imports_dir(runtime.settings) / PurePosixPath(str(archive)).name).unlink(
                missing_ok=True
            )


@dataclass
class _Prepared:
    ref: str
    sha256: str
    image: Image.Image


@dataclass
class _Signals:
    ref: str
    sha256: str
    vector: Any
    pdq: bytes
    quality: int


def _run_import(
    runtime: Runtime, job_id: str, params: dict[str, Any], actor: str
) -> dict[str, Any]:
    bank_name = str(params["bank"])
    path = imports_dir(runtime.settings) / PurePosixPath(str(params["archive"])).name
    with runtime.sessions() as session:
        bank = get_bank(session, bank_name)
        known = set(session.scalars(select(Entry.source_sha256).where(Entry.bank_id == bank.id)))
    skipped: list[tuple[str, str]] = []
    sources = list(iter_sources([path], skipped))
    total = len(sources)
    _set(runtime, job_id, total=total, progress=0)
    limits, batch_size = runtime.limits, runtime.settings.batch_size
    pending: list[_Prepared] = []
    ready: list[_Signals] = []
    last_write = time.monotonic()

    def embed() -> None:
        if not pending:
            return
        vectors, pdqs, _regions = compute_signals(
            [p.image for p in pending], runtime.encoder, batch_size=batch_size
        )
        for prep, vector, (digest, quality) in zip(pending, vectors, pdqs, strict=True):
            ready.append(_Signals(prep.ref, prep.sha256, vector, digest, quality))
        pending.clear()

    for done, source in enumerate(sources, start=1):
        if source.size > limits.max_bytes:
            skipped.append((source.ref, "too_large"))
        else:
            try:
                data = source.read()
            except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
                skipped.append((source.ref, f"unreadable: {exc}"))
                data = None
            if data is not None:
                sha256 = hashlib.sha256(data).hexdigest()
                if sha256 in known:
                    skipped.append((source.ref, "duplicate"))
                else:
                    try:
                        decoded = decode_image(data, limits)
                    except UnscannableImage as exc:
                        skipped.append((source.ref, exc.reason))
                    else:
                        known.add(sha256)
                        pending.append(_Prepared(source.ref, sha256, decoded.frames[0]))
        if len(pending) >= batch_size:
            embed()
        if len(pending) == 0 or time.monotonic() - last_write >= PROGRESS_INTERVAL_S:
            _set(runtime, job_id, progress=done)
            last_write = time.monotonic()
    embed()
    added: list[str] = []

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        target = get_bank(session, bank_name)
        present = set(
            session.scalars(select(Entry.source_sha256).where(Entry.bank_id == target.id))
        )
        signals: list[EntrySignals] = []
        for item in ready:
            if item.sha256 in present:  # imported meanwhile by someone else
                skipped.append((item.ref, "duplicate"))
                continue
            entry = Entry(
                bank_id=target.id,
                label=PurePosixPath(item.ref).stem,
                source_ref=item.ref,
                source_sha256=item.sha256,
                added_by=actor,
            )
            session.add(entry)
            session.flush()
            present.add(item.sha256)
            added.append(entry.public_id)
            signals.append(EntrySignals(entry.id, item.vector, item.pdq, item.quality))
        record_event(
            session,
            actor=actor,
            action="bank.import",
            target=f"bank:{target.id}",
            details={
                "added": len(signals),
                "skipped": len(skipped),
                "job_id": job_id,
                "sources": [str(params.get("filename", ""))],
            },
        )
        return signals, ()

    version = commit_with_snapshot(runtime, change)
    _set(runtime, job_id, progress=total)
    logger.info(
        "import job %s into %s: %d added, %d skipped", job_id, bank_name, len(added), len(skipped)
    )
    return {
        "bank": bank_name,
        "added": len(added),
        "skipped_count": len(skipped),
        "skipped": [{"source_ref": r, "reason": why} for r, why in skipped[:MAX_REPORTED_SKIPS]],
        "snapshot_version": version,
    }


@dataclass(frozen=True)
class JobView:
    """A job as the console shows it."""

    job_id: str
    kind: str
    state: str
    progress: int
    total: int
    params: dict[str, Any]
    result: dict[str, Any]
    created_by: str
    stalled: bool

    @property
    def percent(self) -> int:
        """Progress, 0-100."""
        return (
            100
            if self.state == "done"
            else int(100 * self.progress / self.total)
            if self.total
            else 0
        )

    @property
    def finished(self) -> bool:
        """True once the job is done or failed."""
        return self.state in ("done", "failed")


def job_view(session: Session, job_id: str, *, stall_after_s: float = 600.0) -> JobView | None:
    """The job's state, or None; ``stalled`` when running without progress for ``stall_after_s``."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    updated = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=UTC)
    stalled = (
        job.state == "running" and (datetime.now(UTC) - updated).total_seconds() > stall_after_s
    )
    return JobView(
        job_id=job.id,
        kind=job.kind,
        state=job.state,
        progress=job.progress,
        total=job.total,
        params=dict(job.params),
        result=dict(job.result),
        created_by=job.created_by,
        stalled=stalled,
    )
