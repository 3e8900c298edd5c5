"""Encrypted index snapshot files: writing, verifying and decrypting, and key rotation.

File layout (all integers big-endian)::

    magic       8 bytes   b"MODSNAP\\x00"
    header_len  4 bytes   length of the header, at most 64 KiB
    header      JSON, UTF-8, canonical (sorted keys, no spaces), fields:
                  format (1), snapshot_id, version, encoder_id, created_at (UTC, ISO 8601),
                  key_id (master key wrapping the data key), wrapped_key (base64 of the 60-byte
                  wrap: nonce, encrypted data key, tag)
    nonce       12 bytes
    ciphertext  len(payload) bytes, AES-256-GCM under a fresh data key
    tag         16 bytes

The payload's associated data binds ``format``, ``snapshot_id``, ``version``, ``encoder_id`` and
``created_at``; the wrap's associated data binds ``key_id`` and (snapshot id, version, encoder id).
The wrapped key is deliberately outside the payload's associated data so rotation re-wraps it
without touching the ciphertext. The header must be byte-identical to its canonical encoding,
so every bit of the file is covered by a check: magic, canonical header, expected fields, the
wrap's tag or the payload's tag.

Only ciphertext is written to disk; reading decrypts into memory only. Payloads stream through
AES-GCM in chunks (:mod:`moderation.banks.snapshot_stream`), so they may exceed the 2 GiB
one-shot limit of ``cryptography``'s AEAD API. The plaintext inside is a payload of
:mod:`moderation.banks.payload`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Any

from moderation.banks.payload import Buffer, canonical_json
from moderation.banks.snapshot_header import (
    FORMAT,
    file_parts,
    header_bytes,
    parse_header,
    payload_aad,
    with_wrapped_key,
    wrapped_key_of,
)
from moderation.banks.snapshot_stream import (
    copy_stream,
    decrypt_body,
    encrypt_stream,
    sha256_file,
    wipe,
)
from moderation.crypto.aead import NONCE_BYTES, TAG_BYTES
from moderation.crypto.envelope import (
    WrappedKey,
    generate_data_key,
    rewrap_key,
    unwrap_key,
    wrap_key,
)
from moderation.crypto.errors import CryptoError, DecryptionError, UnknownKeyError
from moderation.crypto.files import write_private_file
from moderation.crypto.keys import KeyRing

logger = logging.getLogger(__name__)

SUFFIX = ".snapshot"
_SNAPSHOT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SnapshotError(Exception):
    """A snapshot cannot be written, read or verified. The message names the file, the
    snapshot id and version when known, and the cause; ``path``, ``snapshot_id`` and
    ``version`` are also attributes."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        snapshot_id: str | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.snapshot_id = snapshot_id
        self.version = version


_Label = tuple[str | None, int | None]
"""Snapshot id and version for error messages, where known."""


def _error(path: Path, cause: str, snapshot_id: str | None, version: int | None) -> SnapshotError:
    name = "snapshot"
    if snapshot_id is not None:
        name += f" {snapshot_id!r}"
    if version is not None:
        name += f" version {version}"
    return SnapshotError(
        f"{name} at {path}: {cause}", path=path, snapshot_id=snapshot_id, version=version
    )


@dataclass(frozen=True)
class SnapshotFile:
    """A snapshot file on disk, as recorded in ``index_snapshots``.

    ``sha256`` is the hex digest of the whole file; ``size_bytes`` its length in bytes.
    """

    path: Path
    snapshot_id: str
    version: int
    encoder_id: str
    key_id: str
    sha256: str
    size_bytes: int


def snapshot_filename(snapshot_id: str, version: int) -> str:
    """``<snapshot_id>-v<version>.snapshot``. Raises ValueError on an invalid id or version."""
    _check_identity(snapshot_id, version)
    return f"{snapshot_id}-v{version}{SUFFIX}"


def key_context(snapshot_id: str, version: int, encoder_id: str) -> str:
    """The context binding a snapshot's wrapped data key
    (:func:`moderation.crypto.envelope.wrap_key`)."""
    return canonical_json(["snapshot", snapshot_id, version, encoder_id]).decode("utf-8")


def _check_identity(snapshot_id: str, version: int) -> None:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID_RE.fullmatch(snapshot_id):
        raise ValueError(
            f"invalid snapshot id {snapshot_id!r}: 1-128 characters from A-Z a-z 0-9 . _ -"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"invalid snapshot version {version!r}: a non-negative integer")


def write_snapshot(
    directory: Path,
    payload: Buffer,
    *,
    snapshot_id: str,
    version: int,
    encoder_id: str,
    keyring: KeyRing,
) -> SnapshotFile:
    """Encrypt ``payload`` under a fresh data key and write ``<directory>/<snapshot_filename>``.

    The data key is wrapped under the ring's primary master key. Ciphertext streams to a 0600
    temp file in ``directory`` (created 0700 if missing), which is fsynced and renamed over the
    target; no plaintext byte reaches the disk and :mod:`tempfile` is not used.

    Args:
        payload: bytes-like, any size (e.g. from :func:`encode_payload`); not copied.
        snapshot_id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, e.g. the deployment's index name.
        version: non-negative integer, bumped by every rebuild.
        encoder_id: the encoder that produced the vectors (name, weights digest, preprocessing).

    Raises:
        ValueError: invalid ``snapshot_id``, ``version`` or empty ``encoder_id``.
        SnapshotError: the file cannot be written (the message names it).
    """
    _check_identity(snapshot_id, version)
    if not encoder_id:
        raise ValueError("encoder_id must not be empty")
    directory = Path(directory)
    path = directory / snapshot_filename(snapshot_id, version)
    data_key = generate_data_key()
    wrapped = wrap_key(data_key, keyring, context=key_context(snapshot_id, version, encoder_id))
    header = with_wrapped_key(
        {
            "format": FORMAT,
            "snapshot_id": snapshot_id,
            "version": version,
            "encoder_id": encoder_id,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        wrapped,
    )
    view = memoryview(payload).cast("B")
    hasher = hashlib.sha256()
    body = encrypt_stream(view, data_key, payload_aad(header))
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_file(path, file_parts(header, body, hasher.update))
    except OSError as exc:
        raise _error(path, f"cannot write: {exc}", snapshot_id, version) from exc
    size = header_bytes(header) + NONCE_BYTES + len(view) + TAG_BYTES
    logger.info(
        "wrote snapshot %s version %d (%d bytes, master key %s) to %s",
        snapshot_id,
        version,
        size,
        wrapped.key_id,
        path,
    )
    return _snapshot_file(path, header, hasher.hexdigest(), size)


def _snapshot_file(path: Path, header: Mapping[str, Any], sha256: str, size: int) -> SnapshotFile:
    return SnapshotFile(
        path=path,
        snapshot_id=header["snapshot_id"],
        version=header["version"],
        encoder_id=header["encoder_id"],
        key_id=header["key_id"],
        sha256=sha256,
        size_bytes=size,
    )


def read_snapshot_header(path: Path) -> dict[str, object]:
    """The validated header of a snapshot file, without decrypting anything.

    Keys: ``format``, ``snapshot_id``, ``version``, ``encoder_id``, ``created_at``, ``key_id``,
    ``wrapped_key`` (base64; not secret). For listings and diagnostics: nothing here is
    authenticated until :func:`read_snapshot` succeeds.

    Raises:
        SnapshotError: unreadable or malformed file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = _fstat_size(handle)
            header, _ = parse_header(handle, size)
            wrapped_key_of(header)
    except (OSError, ValueError) as exc:
        raise _error(path, str(exc), None, None) from exc
    return dict(header)


def _fstat_size(handle: BufferedReader) -> int:
    # The open inode's size: stays right if the path is replaced (rotation) meanwhile.
    return os.fstat(handle.fileno()).st_size


def _read_header(
    handle: BufferedReader, path: Path, label: _Label
) -> tuple[dict[str, Any], int, int, WrappedKey]:
    """The validated header, the body's offset, the file's size and the wrapped data key."""
    try:
        size = _fstat_size(handle)
        header, body_offset = parse_header(handle, size)
        wrapped = wrapped_key_of(header)
    except (OSError, ValueError) as exc:
        raise _error(path, str(exc), *label) from exc
    return header, body_offset, size, wrapped


def read_snapshot(
    path: Path,
    keyring: KeyRing,
    *,
    expected_snapshot_id: str,
    expected_version: int,
    expected_encoder_id: str,
    expected_sha256: str | None = None,
) -> memoryview:
    """Verify and decrypt a snapshot file into memory.

    Checks: the file's SHA-256 against ``expected_sha256`` (when given, e.g. from
    ``index_snapshots.sha256``); magic and canonical header; header fields equal to the expected
    ones (an older snapshot copied over the current one, or another index's, is refused); the
    data key unwraps under the master key the header names (no other key is tried); the payload
    authenticates (AES-GCM tag over the ciphertext and the bound header fields).

    The SHA-256 is computed in one pass with the decryption, on a second thread (``hashlib``
    releases the GIL), so large snapshots are read once and hashed while they decrypt: at
    about 2 GB/s for each of SHA-256 and AES-GCM on the development machine, hashing first
    would add half to the load time. When a digest is expected and any check fails, the
    digest decides the message: a file whose SHA-256 differs is reported as such.

    Returns:
        The plaintext payload: a writable byte ``memoryview`` over new memory (a numpy
        buffer, allocated without zero-filling: ``bytearray(n)`` would write every byte once
        more before decryption does, about a second per 3 GB here). No other copy is made;
        the caller may keep views into it, as zero-copy index loading does. Nothing is
        returned unless every check passed; a refused payload's plaintext is overwritten
        before the error is raised.

    Raises:
        SnapshotError: any failure; the message names the file, the snapshot id and version,
            the master key id when relevant, and the cause.
    """
    path = Path(path)
    label = (expected_snapshot_id, expected_version)
    with _open(path, label) as handle:
        hasher = hashlib.sha256() if expected_sha256 is not None else None
        try:
            plaintext = _verify_and_decrypt(
                handle,
                path,
                keyring,
                (expected_snapshot_id, expected_version, expected_encoder_id),
                hasher,
            )
        except SnapshotError:
            if expected_sha256 is not None:
                _check_file_digest(handle, path, expected_sha256, label)
            raise
        if hasher is not None and expected_sha256 is not None:
            try:
                _check_digest(path, hasher.hexdigest(), expected_sha256, label)
            except SnapshotError:
                wipe(plaintext)
                raise
        return plaintext


def _open(path: Path, label: _Label) -> BufferedReader:
    try:
        return path.open("rb")
    except OSError as exc:
        raise _error(path, f"cannot open: {exc.strerror}", *label) from exc


def _check_file_digest(handle: BufferedReader, path: Path, expected: str, label: _Label) -> None:
    """Raise the digest mismatch, if any, in place of a later check's error."""
    try:
        handle.seek(0)
        _check_digest(path, sha256_file(handle), expected, label)
    except OSError:
        pass  # the first error says more than a failed re-read


def _check_digest(path: Path, actual: str, expected: str, label: _Label) -> None:
    if not hmac.compare_digest(actual, expected.strip().lower()):
        raise _error(
            path, f"SHA-256 is {actual}, expected {expected} (corrupted or replaced)", *label
        )


def _verify_and_decrypt(
    handle: BufferedReader,
    path: Path,
    keyring: KeyRing,
    expected: tuple[str, int, str],
    hasher: Any,
) -> memoryview:
    """Every check of :func:`read_snapshot` but the digest; feeds the whole file to
    ``hasher`` (a ``hashlib`` object, or None) on the way."""
    expected_snapshot_id, expected_version, expected_encoder_id = expected
    label = (expected_snapshot_id, expected_version)
    header, body_offset, size, wrapped = _read_header(handle, path, label)
    for name, value in (
        ("snapshot_id", expected_snapshot_id),
        ("version", expected_version),
        ("encoder_id", expected_encoder_id),
    ):
        if header[name] != value:
            raise _error(
                path,
                f"header {name} is {header[name]!r}, expected {value!r} (an older "
                "snapshot, another index's, or an encoder change)",
                *label,
            )
    context = key_context(header["snapshot_id"], header["version"], header["encoder_id"])
    try:
        data_key = unwrap_key(wrapped, keyring, context=context)
    except UnknownKeyError as exc:
        raise _error(
            path,
            f"its data key is wrapped under master key {wrapped.key_id!r}, which is not in "
            f"the key ring (retired, or another deployment's): {exc}",
            *label,
        ) from exc
    except DecryptionError as exc:
        raise _error(
            path,
            f"its data key does not unwrap with master key {wrapped.key_id!r}: the header "
            "was altered, or the file comes from another deployment",
            *label,
        ) from exc
    try:
        return decrypt_body(handle, size, body_offset, data_key, payload_aad(header), hasher)
    except (OSError, ValueError, CryptoError) as exc:
        raise _error(path, str(exc), *label) from exc


def rewrap_snapshot(path: Path, keyring: KeyRing) -> SnapshotFile:
    """Re-wrap a snapshot's data key under the ring's primary master key (key rotation).

    The ciphertext is copied unchanged (not decrypted); the new file replaces the old one
    atomically. A snapshot already under the primary is left as it is (rotation can be re-run).

    Returns:
        The snapshot as now on disk, with its new ``sha256`` and ``key_id`` for
        ``index_snapshots``.

    Raises:
        SnapshotError: unreadable or malformed file, the current master key is not in the ring,
            or the wrapped key does not authenticate.
    """
    path = Path(path)
    with _open(path, (None, None)) as handle:
        header, body_offset, size, wrapped = _read_header(handle, path, (None, None))
        label = (header["snapshot_id"], header["version"])
        context = key_context(header["snapshot_id"], header["version"], header["encoder_id"])
        try:
            rewrapped = rewrap_key(wrapped, keyring, context=context)
        except CryptoError as exc:
            raise _error(path, f"cannot re-wrap its data key: {exc}", *label) from exc
        if rewrapped is wrapped:
            handle.seek(0)
            return _snapshot_file(path, header, sha256_file(handle), size)
        new_header = with_wrapped_key(header, rewrapped)
        body = copy_stream(handle, body_offset, size - body_offset)
        digest = _rewrite(path, new_header, body, label)
        logger.info(
            "re-wrapped snapshot %s version %d from master key %s to %s",
            header["snapshot_id"],
            header["version"],
            wrapped.key_id,
            rewrapped.key_id,
        )
    return _snapshot_file(path, new_header, digest, header_bytes(new_header) + size - body_offset)


def _rewrite(path: Path, header: Mapping[str, Any], body: Iterator[Buffer], label: _Label) -> str:
    """Replace the file at ``path`` with ``header`` and ``body``; the new file's hex SHA-256."""
    hasher = hashlib.sha256()
    try:
        write_private_file(path, file_parts(header, body, hasher.update))
    except (OSError, ValueError) as exc:
        raise _error(path, f"cannot rewrite: {exc}", *label) from exc
    return hasher.hexdigest()
