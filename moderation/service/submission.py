"""The HTTP hook's side of the screening queue: accept an upload, commit it, then send its task.

:func:`submit_upload` stores the upload encrypted, commits its row, and only then sends the
task (STYLE.md rule 15). A failed send leaves a committed ``queued`` row for the reconciler
(:func:`moderation.service.queue.reconcile`). A synchronous request waits, bounded, for the
worker's decision with :func:`moderation.service.waits.wait_for_upload`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.sealed_fields import content_hmac
from moderation.crypto.keys import KeyRing
from moderation.media.formats import sniff_format
from moderation.service.backpressure import admit_upload
from moderation.service.dispatch import Dispatcher
from moderation.service.metrics import ENQUEUE_FAILURES
from moderation.service.subjects import pseudonymize
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, Upload

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


class SubmissionError(Exception):
    """An upload was refused; ``code`` and ``status`` map to the HTTP error contract."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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


def _reused(session: Session, keyring: KeyRing, existing: Upload, data: bytes) -> Submission:
    if existing.content_hmac != content_hmac(session, keyring, data):
        raise SubmissionError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different image",
        )
    return Submission(existing.id, existing.status, created=False, sent=False)


def _active_client(session: Session, client_id: int) -> ApiClient:
    client = session.get(ApiClient, client_id)
    if client is None or client.disabled:
        raise SubmissionError(403, "forbidden", "unknown or disabled API client")
    return client


def _create(
    session: Session,
    runtime: Runtime,
    client: ApiClient,
    data: bytes,
    *,
    external_id: str | None,
    subject_id: str | None,
    callback_url: str | None,
    key_hash: str | None,
) -> Upload:
    """Check the callback URL against ``client``'s allowlist, then store the upload ``queued``."""
    from moderation.service.callback_urls import url_allowed

    if callback_url and not url_allowed(callback_url, client.callback_allowlist):
        raise SubmissionError(
            422,
            "callback_not_allowed",
            "callback_url does not match this client's callback allowlist",
        )
    subject_ref = pseudonymize(session, runtime.keyring, subject_id) if subject_id else None
    return create_upload(
        session,
        data,
        keyring=runtime.keyring,
        blobs_dir=runtime.settings.blobs_dir,
        external_id=external_id,
        subject_ref=subject_ref,
        source="api",
        client_id=client.id,
        idempotency_key=key_hash,
        callback_url=callback_url or None,
        status="queued",
    )


def _record_receive(
    session: Session, upload: Upload, data: bytes, fmt: str, *, origin: str | None
) -> None:
    record_event(
        session,
        actor=f"client:{upload.client_id}",
        action="upload.receive",
        target=f"upload:{upload.id}",
        origin=origin,
        details={
            "size_bytes": len(data),
            "format": fmt,
            "subject_ref": upload.subject_ref,
            "callback": bool(upload.callback_url),
        },
    )


def _send(dispatcher: Dispatcher, upload_id: str) -> Submission:
    """Send the committed upload's task; a broker failure leaves it to the reconciler (Q7)."""
    try:
        dispatcher.send_screening(upload_id)
    except Exception:  # broker down: the committed row is picked up by the reconciler
        ENQUEUE_FAILURES.inc()
        logger.warning(
            "upload %s committed but its task could not be sent; the reconciler will send it",
            upload_id,
            exc_info=True,
        )
        return Submission(upload_id, "queued", created=True, sent=False)
    return Submission(upload_id, "queued", created=True, sent=True)


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

    A new upload (not a replay) is refused while the queue is at its depth bound
    (:func:`moderation.service.backpressure.admit_upload`), before anything is stored.

    Raises:
        SubmissionError: 400/413/415 bad image, 422 callback URL not on the client's allowlist
            or an idempotency key reused for another image, 403 unknown or disabled client.
        QueueFullError: 503 past the global queue-depth bound, 429 past the client's share.
    """
    settings = runtime.settings
    fmt = check_image_bytes(data, settings.max_image_bytes)
    key_hash = idempotency_hash(idempotency_key) if idempotency_key else None
    created_id: str | None = None
    try:
        with transaction(runtime.sessions) as session:
            client = _active_client(session, client_id)
            if key_hash is not None:
                existing = _existing(session, client_id, key_hash)
                if existing is not None:
                    return _reused(session, runtime.keyring, existing, data)
            admit_upload(session, settings, client_id)  # before anything is stored (S3)
            upload = _create(
                session,
                runtime,
                client,
                data,
                external_id=external_id,
                subject_id=subject_id,
                callback_url=callback_url,
                key_hash=key_hash,
            )
            created_id = upload.id
            _record_receive(session, upload, data, fmt, origin=origin)
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
            return _reused(session, runtime.keyring, existing, data)
    assert created_id is not None
    return _send(dispatcher, created_id)
