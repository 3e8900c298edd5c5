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
The uploaded zip is staged sealed (:mod:`moderation.banks.job_staging`), decrypted into memory
only while the job reads it, and deleted when the job ends. The import goes through the
importer's own steps (:func:`prepare_import`, :func:`add_entries`), so it computes the same
signals as the CLI: entry windows and training copies for the classifier stage included.

The hash-list import job (``bank.import_hashes``, :mod:`moderation.banks.hash_jobs`) runs
:func:`moderation.banks.hash_import.import_hash_list` on an uploaded hash list.
"""

from __future__ import annotations

import io
import logging
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.hash_jobs import HASH_IMPORT_KIND, run_hash_import
from moderation.banks.importer import (
    ImportReport,
    add_entries,
    known_hashes,
    prepare_import,
    zip_sources,
)
from moderation.banks.job_staging import (
    JobError,
    JobFailed,
    open_staged,
    progress_writer,
    queue_staged_job,
    read_upload,
    remove_staged,
    set_job,
)
from moderation.banks.operations import (
    commit_with_snapshot,
    originals_vault,
    record_bank_import,
)
from moderation.banks.records import get_bank
from moderation.banks.sealed_fields import hmac_key, open_bank_note, seal_bank_note
from moderation.banks.snapshot_payload import EntrySignals
from moderation.config import Settings
from moderation.crypto.keys import KeyRing
from moderation.storage.console import Job
from moderation.storage.db import transaction
from moderation.storage.models import Bank

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

IMPORT_KIND = "bank.import"
MAX_REPORTED_SKIPS = 1000
"""Skipped sources listed in a job's result; the count is always complete."""


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
    return queue_staged_job(
        session,
        settings,
        kind=IMPORT_KIND,
        bank=bank,
        params={"filename": filename[:200]},
        data=data,
        keyring=keyring,
        created_by=created_by,
    )


def _read_zip_upload(archive: IO[bytes], max_bytes: int) -> bytes:
    """The whole upload, read in chunks.

    Raises:
        JobError: it is larger than ``max_bytes`` or not a zip archive.
    """
    data = read_upload(archive, max_bytes, what="archive")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise JobError("the upload is not a zip archive")
    return data


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
        if kind == IMPORT_KIND:
            result = _run_import(runtime, job_id, params, actor)
        elif kind == HASH_IMPORT_KIND:
            result = run_hash_import(runtime, job_id, params, actor)
        else:
            raise JobError(f"unknown job kind {kind!r}")
    except JobFailed as exc:
        logger.info("job %s (%s) refused: %s", job_id, kind, exc)
        set_job(runtime, job_id, state="failed", result={"error": str(exc), **exc.details})
    except Exception as exc:  # any failure ends the job, with its message
        logger.exception("job %s (%s) failed", job_id, kind)
        set_job(
            runtime, job_id, state="failed", result={"error": f"{type(exc).__name__}: {exc}"[:1000]}
        )
    else:
        set_job(runtime, job_id, state="done", result=result)
    finally:
        remove_staged(runtime.settings, params)


def _bank_state(runtime: Runtime, bank_name: str) -> tuple[set[str], bool, bytes]:
    """The bank's known content HMACs, whether it keeps originals, and the HMAC key (committed
    here if it is new)."""
    with transaction(runtime.sessions) as session:
        bank = get_bank(session, bank_name)
        return (
            known_hashes(session, bank.id),
            bank.retain_originals,
            hmac_key(session, runtime.keyring),
        )


def _run_import(
    runtime: Runtime, job_id: str, params: dict[str, Any], actor: str
) -> dict[str, Any]:
    bank_name = str(params["bank"])
    data = open_staged(runtime, job_id, params)
    known, retain, key = _bank_state(runtime, bank_name)
    report = ImportReport(bank=bank_name)
    sources = list(zip_sources(lambda: zipfile.ZipFile(io.BytesIO(data)), "", report.skipped))
    total = len(sources)
    set_job(runtime, job_id, total=total, progress=0)
    write_progress = progress_writer(runtime, job_id)
    runtime.follow_serving_encoder()  # before the hooks, which embed entry windows with it
    hooks = runtime.import_hooks()
    prepared = prepare_import(
        sources,
        report.skipped,
        known=known,
        hmac_key=key,
        encoder=runtime.encoder,
        limits=runtime.limits,
        batch_size=runtime.settings.batch_size,
        region_embedder=hooks.region_embedder,
        on_images=hooks.on_images,
        progress=lambda done, _count: write_progress(done),
        keep_originals=retain,
    )

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        signals = add_entries(
            session,
            bank_name,
            prepared,
            report,
            keyring=runtime.keyring,
            added_by=actor,
            vault=originals_vault(runtime),
        )
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

    version = commit_with_snapshot(runtime, change, follow_encoder=False)
    if hooks.after_commit is not None:
        report.training_pairs = hooks.after_commit(report.entry_of, actor)
    return _finish_import(runtime, job_id, report, version, total)


def _finish_import(
    runtime: Runtime, job_id: str, report: ImportReport, version: int, total: int
) -> dict[str, Any]:
    """Mark the job's progress complete and return its result (:func:`_import_result`)."""
    set_job(runtime, job_id, progress=total)
    logger.info(
        "import job %s into %s: %d added, %d skipped",
        job_id,
        report.bank,
        len(report.added),
        len(report.skipped),
    )
    with transaction(runtime.sessions) as session:
        return _import_result(session, runtime.keyring, job_id, report, version)


def _skipped_purpose(job_id: str) -> str:
    return f"job:{job_id}:skipped"


def _import_result(
    session: Session, keyring: KeyRing, job_id: str, report: ImportReport, version: int
) -> dict[str, Any]:
    """The job result of a finished import. The first :data:`MAX_REPORTED_SKIPS` skips name
    files of the imported (banned) set, so they are sealed under the bank's key
    (:func:`~moderation.banks.sealed_fields.seal_bank_note`); :func:`job_view` opens them."""
    skipped = [{"source_ref": r, "reason": why} for r, why in report.skipped[:MAX_REPORTED_SKIPS]]
    bank_id = get_bank(session, report.bank).id
    return {
        "bank": report.bank,
        "added": len(report.added),
        "skipped_count": len(report.skipped),
        "skipped": [],
        "skipped_sealed": seal_bank_note(
            session, keyring, bank_id, _skipped_purpose(job_id), skipped
        ),
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


def _opened_result(session: Session, keyring: KeyRing | None, job: Job) -> dict[str, Any]:
    result = dict(job.result)
    sealed = result.pop("skipped_sealed", None)
    if sealed is not None and keyring is not None:
        bank_id = session.scalar(select(Bank.id).where(Bank.name == result.get("bank")))
        if bank_id is not None:
            purpose = _skipped_purpose(job.id)
            result["skipped"] = open_bank_note(session, keyring, bank_id, purpose, sealed)
    return result


def job_view(
    session: Session,
    job_id: str,
    *,
    keyring: KeyRing | None = None,
    stall_after_s: float = 600.0,
) -> JobView | None:
    """The job's state, or None; ``stalled`` when running without progress for ``stall_after_s``.
    With ``keyring``, an import's sealed list of skipped files is opened into ``skipped``."""
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
        result=_opened_result(session, keyring, job),
        created_by=job.created_by,
        stalled=stalled,
    )
