"""Uploads: each image is stored encrypted under its own data key (crypto-shredding).

The blob file holds only ciphertext; the upload's data key, wrapped by a master key, lives in
its database row. Destroying the wrapped key makes every copy of the blob (backups included)
unreadable.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy.orm import Session

from moderation.banks.sealed_fields import hmac_key, keyed_sha256
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Upload, new_uuid

T = TypeVar("T")

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
    upload = Upload(
        id=new_uuid(),
        external_id=external_id,
        subject_ref=subject_ref,
        source=source,
        client_id=client_id,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        status=status,
    )
    return _store(session, [(upload, data)], keyring=keyring, blobs_dir=blobs_dir)[0]


def create_uploads(
    session: Session,
    items: Sequence[tuple[bytes | None, str | None]],
    *,
    keyring: KeyRing,
    blobs_dir: Path,
    subject_ref: str | None = None,
    source: str = "cli",
    status: str = "queued",
) -> list[Upload]:
    """:func:`create_upload` for a batch of ``(data, external_id)``: the same rows and blobs,
    the blob files written and fsynced concurrently (the waits are the disk's: a file system
    commits concurrent fsyncs together) and the rows flushed once.

    Raises:
        OSError: a blob could not be written (the others may remain, unreadable without keys).
    """
    pairs = [
        (
            Upload(
                id=new_uuid(),
                external_id=external_id,
                subject_ref=subject_ref,
                source=source,
                status=status,
            ),
            data,
        )
        for data, external_id in items
    ]
    return _store(session, pairs, keyring=keyring, blobs_dir=blobs_dir)


#: Blob files written at once by :func:`create_uploads` (fsync waits, not CPU work).
_BLOB_WRITERS = 8


def _store(
    session: Session,
    pairs: Sequence[tuple[Upload, bytes | None]],
    *,
    keyring: KeyRing,
    blobs_dir: Path,
) -> list[Upload]:
    """Seal each upload's data, write the blobs (concurrently when several), add the rows and
    flush once."""
    writes: list[tuple[Path, bytes]] = []
    key = hmac_key(session, keyring) if any(data is not None for _, data in pairs) else b""
    for upload, data in pairs:
        if data is None:
            continue
        sealed, wrapped = seal_blob(data, keyring, context=_context(upload.id))
        path = _blob_path(blobs_dir, upload.id)
        writes.append((path, sealed))
        upload.blob_ref = str(path.relative_to(blobs_dir))
        upload.wrapped_key = wrapped.to_bytes()
        upload.key_id = wrapped.key_id
        upload.content_hmac = keyed_sha256(key, data)  # sealed_fields.content_hmac, key read once
        upload.size_bytes = len(data)
    if len(writes) > 1:
        with ThreadPoolExecutor(min(_BLOB_WRITERS, len(writes))) as pool:
            list(pool.map(lambda w: _write_blob(*w), writes))
    else:
        for path, sealed in writes:
            off_the_hub(_write_blob, path, sealed)
    session.add_all([upload for upload, _ in pairs])
    session.flush()
    return [upload for upload, _ in pairs]


def off_the_hub(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, on one of gevent's native threads when gevent has patched this
    process (``moderation serve``'s workers), else directly. For file I/O that blocks in the
    kernel (fsync: about 8 ms here): on the hub it would stop every greenlet of the process;
    on a native thread only the calling greenlet waits (gevent docs, "gevent.threadpool")."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent

        return cast(T, gevent.get_hub().threadpool.apply(function, args))
    return function(*args)


def _write_blob(path: Path, sealed: bytes) -> None:
    """``sealed`` to ``path`` atomically and durably (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(sealed)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
