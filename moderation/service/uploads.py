"""Uploads: each image is stored encrypted under its own data key (crypto-shredding).

The blob file holds only ciphertext; the upload's data key, wrapped by a master key, lives in
its database row. Destroying the wrapped key makes every copy of the blob (backups included)
unreadable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.orm import Session

from moderation.banks.sealed_fields import content_hmac
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Upload, new_uuid

logger = logging.getLogger(__name__)


class BlobMissingError(Exception):
    """The upload's blob or its data key is gone (erased or never stored)."""


def _blob_path(blobs_dir: Path, upload_id: str) -> Path:
    return blobs_dir / upload_id[:2] / f"{upload_id}.blob"


def _context(upload_id: str) -> str:
    return f"upload:{upload_id}"


def create_upload(
    session: Session,
    data: bytes | None,
    *,
    keyring: KeyRing,
    blobs_dir: Path,
    external_id: str | None = None,
    subject_ref: str | None = None,
    source: str = "cli",
    client_id: int | None = None,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    status: str = "queued",
) -> Upload:
    """Encrypt ``data`` to a new blob file and add its :class:`Upload` row to ``session``.

    The blob is written (atomically, ciphertext only) before the row is flushed; if the
    caller's transaction then fails, the orphan blob is unreadable without its key. With
    ``data=None`` (an input refused before reading, e.g. over the byte limit) no blob is kept.

    Raises:
        OSError: the blob could not be written.
    """
    upload_id = new_uuid()
    upload = Upload(
        id=upload_id,
        external_id=external_id,
        subject_ref=subject_ref,
        source=source,
        client_id=client_id,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        status=status,
    )
    if data is not None:
        sealed, wrapped = seal_blob(data, keyring, context=_context(upload_id))
        path = _blob_path(blobs_dir, upload_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(sealed)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        upload.blob_ref = str(path.relative_to(blobs_dir))
        upload.wrapped_key = wrapped.to_bytes()
        upload.key_id = wrapped.key_id
        upload.content_hmac = content_hmac(session, keyring, data)
        upload.size_bytes = len(data)
    session.add(upload)
    session.flush()
    return upload


def read_upload(upload: Upload, *, keyring: KeyRing, blobs_dir: Path) -> bytes:
    """Decrypt an upload's bytes (in memory).

    Raises:
        BlobMissingError: the blob or its wrapped key is gone.
        moderation.crypto.errors.CryptoError: the blob does not authenticate.
    """
    if not upload.blob_ref or not upload.wrapped_key:
        raise BlobMissingError(f"upload {upload.id} has no stored blob")
    path = blobs_dir / upload.blob_ref
    try:
        sealed = path.read_bytes()
    except FileNotFoundError as exc:
        raise BlobMissingError(f"upload {upload.id}: blob {path} is missing") from exc
    wrapped = WrappedKey.from_bytes(upload.wrapped_key)
    return open_blob(sealed, wrapped, keyring, context=_context(upload.id))


def shred_upload(upload: Upload, *, blobs_dir: Path) -> bool:
    """Destroy an upload's data key and delete its blob file; True when a blob was deleted."""
    upload.wrapped_key = None
    deleted = False
    if upload.blob_ref:
        path = blobs_dir / upload.blob_ref
        if path.exists():
            path.unlink()
            deleted = True
    upload.blob_ref = None
    return deleted
