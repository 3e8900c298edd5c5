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
The uploaded zip is staged in ``<data_dir>/imports`` sealed (AES-256-GCM under a fresh data key
wrapped by the primary master key, :func:`moderation.crypto.envelope.seal_blob`; the wrapped key
is kept in the job's parameters), decrypted into memory only while the job reads it, and deleted
when the job ends. The import goes through the importer's own steps (:func:`prepare_import`,
:func:`add_entries`), so it computes the same signals as the CLI: entry windows and training
copies for the classifier stage included.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.importer import (
    ImportReport,
    add_entries,
    known_hashes,
    prepare_import,
    zip_sources,
)
from moderation.banks.operations import commit_with_snapshot, record_bank_import
from moderation.banks.records import get_bank
from moderation.banks.snapshot_payload import EntrySignals
from moderation.config import Settings
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.files import write_private_file
from moderation.crypto.keys import KeyRing, load_keyring
from moderation.storage.db import transaction
from moderation.storage.models import Job

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

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


def staged_path(settings: Settings, job_id: str) -> Path:
    """Where the sealed archive of job ``job_id`` waits."""
    return imports_dir(settings) / f"{PurePosixPath(job_id).name}.zip.sealed"


def _context(job_id: str) -> str:
    return f"import-archive:{job_id}"


def create_import_job(
    session: Session,
    settings: Settings,
    *,
    bank_name: str,
    archive: IO[bytes],
    filename: str,
    created_by: str,
    max_bytes: int,
    keyring: KeyRing | None = None,
) -> Job:
    """Stage a zip archive, sealed, and add a queued ``bank.import`` job for it (audited
    ``job.create``).

    Args:
        archive: the uploaded file, read in chunks (held in memory to be sealed).
        filename: the client's name for it (untrusted: display only).
        max_bytes: refuse archives larger than this, bytes.
        keyring: master keys sealing the staged copy; default: loaded from ``settings``.

    Raises:
        BlocklistError: unknown bank.
        JobError: the upload is not a zip archive or is too large.
    """
    bank = get_bank(session, bank_name)
    data = _read_zip_upload(archive, max_bytes)
    job = Job(
        kind=IMPORT_KIND,
        state="queued",
        params={"bank": bank.name, "filename": filename[:200]},
        created_by=created_by,
    )
    session.add(job)
    session.flush()
    job.params = {**job.params, **_stage_sealed(settings, job.id, data, keyring)}
    record_event(
        session,
        actor=created_by,
        action="job.create",
        target=f"job:{job.id}",
        details={"kind": IMPORT_KIND, "bank_id": bank.id, "size_bytes": len(data)},
    )
    return job


def _read_zip_upload(archive: IO[bytes], max_bytes: int) -> bytes:
    """The whole upload, read in chunks.

    Raises:
        JobError: it is larger than ``max_bytes`` or not a zip archive.
    """
    buffer = io.BytesIO()
    while chunk := archive.read(_COPY_CHUNK):
        if buffer.tell() + len(chunk) > max_bytes:
            raise JobError(f"the archive is larger than {max_bytes} bytes")
        buffer.write(chunk)
    data = buffer.getvalue()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise JobError("the upload is not a zip archive")
    return data


def _stage_sealed(
    settings: Settings, job_id: str, data: bytes, keyring: KeyRing | None
) -> dict[str, Any]:
    """Seal ``data`` under a fresh data key and write it to the job's staged path; returns the
    job parameters that find and unwrap it (file name, size, wrapped key)."""
    sealed, wrapped = seal_blob(data, keyring or load_keyring(settings), context=_context(job_id))
    directory = imports_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = staged_path(settings, job_id)
    try:
        write_private_file(path, [sealed])
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {
        "archive": path.name,
        "size_bytes": len(data),
        "wrapped_key": base64.b64encode(wrapped.to_bytes()).decode(),
    }


def _open_archive(runtime: Runtime, job_id: str, params: dict[str, Any]) -> bytes:
    """The staged archive of a job, decrypted (in memory only).

    Raises:
        JobError: the staged file is missing.
        moderation.crypto.errors.CryptoError: tampering, wrong key.
    """
    path = imports_dir(runtime.settings) / PurePosixPath(str(params["archive"])).name
    try:
        sealed = path.read_bytes()
    except FileNotFoundError:
        raise JobError("the staged archive is gone") from None
    wrapped = WrappedKey.from_bytes(base64.b64decode(str(params["wrapped_key"])))
    return open_blob(sealed, wrapped, runtime.keyring, context=_context(job_id))


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


def _run_import(
    runtime: Runtime, job_id: str, params: dict[str, Any], actor: str
) -> dict[str, Any]:
    bank_name = str(params["bank"])
    data = _open_archive(runtime, job_id, params)
    with runtime.sessions() as session:
        known = known_hashes(session, get_bank(session, bank_name).id)
    report = ImportReport(bank=bank_name)
    sources = list(zip_sources(lambda: zipfile.ZipFile(io.BytesIO(data)), "", report.skipped))
    total = len(sources)
    _set(runtime, job_id, total=total, progress=0)
    progress = _progress_writer(runtime, job_id)
    hooks = runtime.import_hooks()
    prepared = prepare_import(
        sources,
        report.skipped,
        known=known,
        encoder=runtime.encoder,
        limits=runtime.limits,
        batch_size=runtime.settings.batch_size,
        region_embedder=hooks.region_embedder,
        on_images=hooks.on_images,
        progress=progress,
    )

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        signals = add_entries(session, bank_name, prepared, report, added_by=actor)
        record_bank_import(
            session,
            actor=actor,
            bank_name=bank_name,
            added=len(signals),
            skipped=len(report.skipped),
            sources=[str(params.get("filename", ""))],
            job_id=job_id,
        )
        return signals, ()

    version = commit_with_snapshot(runtime, change)
    if hooks.after_commit is not None:
        report.training_pairs = hooks.after_commit(report.entry_of, actor)
    _set(runtime, job_id, progress=total)
    logger.info(
        "import job %s into %s: %d added, %d skipped",
        job_id,
        bank_name,
        len(report.added),
        len(report.skipped),
    )
    return _import_result(report, version)


def _progress_writer(runtime: Runtime, job_id: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that records ``done`` on the job at most every
    :data:`PROGRESS_INTERVAL_S` seconds."""
    last_write = time.monotonic()

    def progress(done: int, count: int) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= PROGRESS_INTERVAL_S:
            _set(runtime, job_id, progress=done)
            last_write = time.monotonic()

    return progress


def _import_result(report: ImportReport, version: int) -> dict[str, Any]:
    """The job result of a finished import (the first :data:`MAX_REPORTED_SKIPS` skips)."""
    return {
        "bank": report.bank,
        "added": len(report.added),
        "skipped_count": len(report.skipped),
        "skipped": [
            {"source_ref": r, "reason": why} for r, why in report.skipped[:MAX_REPORTED_SKIPS]
        ],
        "snapshot_version": version,
        "training_pairs": report.training_pairs,
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
