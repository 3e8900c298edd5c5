"""The hash-list import job (``bank.import_hashes``): an uploaded hash list imported in the
background by :func:`moderation.banks.hash_import.import_hash_list`.

The console stages the upload sealed (:mod:`moderation.banks.job_staging`) with
:func:`create_hash_import_job`; :func:`moderation.banks.jobs.run_job` calls
:func:`run_hash_import`. The job decrypts the list into memory and parses it there
(:class:`~moderation.banks.hashlists.records.ListSource`): the plaintext list is never written,
so the data directory holds it only sealed, and only until the job ends. A file with malformed lines
fails the job (:class:`~moderation.banks.job_staging.JobFailed`) with every line number and
reason in its result, and imports nothing.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from moderation.banks.hash_import import HashListError, import_hash_list
from moderation.banks.hashlists import FORMATS
from moderation.banks.hashlists.records import ListSource
from moderation.banks.job_staging import (
    JobError,
    JobFailed,
    open_staged,
    progress_writer,
    queue_staged_job,
    read_upload,
    set_job,
)
from moderation.banks.records import get_bank
from moderation.config import Settings
from moderation.crypto.keys import KeyRing
from moderation.storage.console import Job

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

HASH_IMPORT_KIND = "bank.import_hashes"
MAX_REPORTED_LINES = 1000
"""Malformed or skipped lines listed in a job's result; the counts are always complete."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def create_hash_import_job(
    session: Session,
    settings: Settings,
    *,
    bank_name: str,
    upload: IO[bytes],
    filename: str,
    fmt: str,
    created_by: str,
    max_bytes: int,
    keyring: KeyRing | None = None,
) -> Job:
    """Stage a hash list, sealed, and add a queued ``bank.import_hashes`` job for it (audited
    ``job.create``).

    Args:
        upload: the uploaded file, read in chunks (held in memory to be sealed).
        filename: the client's name for it (untrusted: sanitised, it names the entries'
            ``source_ref`` and the import's audit event).
        fmt: one of :data:`moderation.banks.hashlists.FORMATS`.
        max_bytes: refuse lists larger than this, bytes.
        keyring: master keys sealing the staged copy; default: loaded from ``settings``.

    Raises:
        BlocklistError: unknown bank.
        JobError: unknown format, or the upload is too large.
    """
    if fmt not in FORMATS:
        raise JobError(f"unknown hash-list format {fmt!r}")
    bank = get_bank(session, bank_name)
    data = read_upload(upload, max_bytes, what="hash list")
    return queue_staged_job(
        session,
        settings,
        kind=HASH_IMPORT_KIND,
        bank=bank,
        params={"filename": _safe_name(filename), "format": fmt},
        data=data,
        keyring=keyring,
        created_by=created_by,
    )


def _safe_name(filename: str) -> str:
    name = _UNSAFE.sub("_", PurePosixPath(filename.replace("\\", "/")).name).strip("._")
    return name[:200] or "hashes.txt"


def run_hash_import(
    runtime: Runtime, job_id: str, params: dict[str, Any], actor: str
) -> dict[str, Any]:
    """Import a staged hash list; returns the job's result (the import report).

    Raises:
        JobFailed: malformed lines (nothing imported; ``errors`` lists line and reason).
        JobError: the staged upload is gone.
    """
    source = ListSource.from_bytes(
        _safe_name(str(params.get("filename", ""))), open_staged(runtime, job_id, params)
    )
    try:
        report = import_hash_list(
            runtime,
            str(params["bank"]),
            source,
            fmt=str(params.get("format", "auto")),
            actor=actor,
            progress=progress_writer(runtime, job_id),
        )
    except HashListError as exc:
        raise JobFailed(
            f"{len(exc.errors)} malformed line(s), nothing imported",
            {
                "errors_count": len(exc.errors),
                "errors": [{"line": e.line, "reason": e.reason} for e in exc.errors][
                    :MAX_REPORTED_LINES
                ],
            },
        ) from exc
    set_job(runtime, job_id, total=report.records, progress=report.records)
    result = report.to_json()
    result["skipped_count"] = len(report.skipped)
    result["skipped"] = result["skipped"][:MAX_REPORTED_LINES]
    return result
