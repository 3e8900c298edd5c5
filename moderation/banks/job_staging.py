"""What every kind of background job shares: the sealed staging of an upload, and job updates.

An upload waits for its job in ``<data_dir>/imports`` (mode 0700), sealed with AES-256-GCM
under a fresh data key wrapped by the primary master key
(:func:`moderation.crypto.envelope.seal_blob`); the wrapped key is kept in the job's
parameters, so the staged file alone reveals nothing. The job decrypts it into memory only
while it reads it (:func:`open_staged`) and deletes it when it ends (:func:`remove_staged`).
The job's parameters ``archive`` (the staged file's name, whatever was uploaded), ``size_bytes``
and ``wrapped_key`` find and unwrap it.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.config import Settings
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.files import write_private_file
from moderation.crypto.keys import KeyRing, load_keyring
from moderation.storage.console import Job
from moderation.storage.db import transaction
from moderation.storage.models import Bank

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

PROGRESS_INTERVAL_S = 0.5
"""At most one progress write per this many seconds (plus one per embedded batch)."""
_COPY_CHUNK = 1024 * 1024


class JobError(Exception):
    """A job could not be created or run (bad upload, unknown kind, unknown bank)."""


class JobFailed(JobError):
    """A job ran and was refused; ``details`` go into the job's result next to ``error``."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def imports_dir(settings: Settings) -> Path:
    """Where uploaded files wait for their job (mode 0700)."""
    return settings.resolved_data_dir / "imports"


def staged_path(settings: Settings, job_id: str) -> Path:
    """Where the sealed upload of job ``job_id`` waits."""
    return imports_dir(settings) / f"{PurePosixPath(job_id).name}.sealed"


def _context(job_id: str) -> str:
    # Kept from when zip archives were the only uploads: staged files already sealed under it
    # must still open.
    return f"import-archive:{job_id}"


def read_upload(upload: IO[bytes], max_bytes: int, *, what: str) -> bytes:
    """The whole upload, read in chunks.

    Raises:
        JobError: it is larger than ``max_bytes`` (the message names it ``what``).
    """
    buffer = io.BytesIO()
    while chunk := upload.read(_COPY_CHUNK):
        if buffer.tell() + len(chunk) > max_bytes:
            raise JobError(f"the {what} is larger than {max_bytes} bytes")
        buffer.write(chunk)
    return buffer.getvalue()


def stage_sealed(
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


def queue_staged_job(
    session: Session,
    settings: Settings,
    *,
    kind: str,
    bank: Bank,
    params: dict[str, Any],
    data: bytes,
    keyring: KeyRing | None,
    created_by: str,
) -> Job:
    """Add a queued job of ``kind`` for ``bank`` with ``data`` staged sealed (its reference
    merged into ``params``), and its ``job.create`` audit event, in the caller's transaction."""
    job = Job(
        kind=kind, state="queued", params={"bank": bank.name, **params}, created_by=created_by
    )
    session.add(job)
    session.flush()
    job.params = {**job.params, **stage_sealed(settings, job.id, data, keyring)}
    record_event(
        session,
        actor=created_by,
        action="job.create",
        target=f"job:{job.id}",
        details={"kind": kind, "bank_id": bank.id, "size_bytes": len(data)},
    )
    return job


def open_staged(runtime: Runtime, job_id: str, params: dict[str, Any]) -> bytes:
    """The staged upload of a job, decrypted (in memory only).

    Raises:
        JobError: the staged file is missing.
        moderation.crypto.errors.CryptoError: tampering, wrong key.
    """
    path = imports_dir(runtime.settings) / PurePosixPath(str(params["archive"])).name
    try:
        sealed = path.read_bytes()
    except FileNotFoundError:
        raise JobError("the staged upload is gone") from None
    wrapped = WrappedKey.from_bytes(base64.b64decode(str(params["wrapped_key"])))
    return open_blob(sealed, wrapped, runtime.keyring, context=_context(job_id))


def remove_staged(settings: Settings, params: dict[str, Any]) -> None:
    """Delete a job's staged upload, if any."""
    staged = params.get("archive")
    if staged:
        (imports_dir(settings) / PurePosixPath(str(staged)).name).unlink(missing_ok=True)


def set_job(runtime: Runtime, job_id: str, **values: Any) -> None:
    """Update the job's columns in a transaction of their own."""
    with transaction(runtime.sessions) as session:
        job = session.get(Job, job_id)
        if job is not None:
            for key, value in values.items():
                setattr(job, key, value)


def progress_writer(runtime: Runtime, job_id: str) -> Callable[[int], None]:
    """A ``progress(done)`` callback that records ``done`` on the job at most every
    :data:`PROGRESS_INTERVAL_S` seconds."""
    last_write = time.monotonic()

    def progress(done: int) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= PROGRESS_INTERVAL_S:
            set_job(runtime, job_id, progress=done)
            last_write = time.monotonic()

    return progress
