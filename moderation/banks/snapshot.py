"""Encrypted index snapshot files, and the payload codec inside them (no pickle).

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
AES-GCM in chunks, so they may exceed the 2 GiB one-shot limit of ``cryptography``'s AEAD API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from moderation.crypto import (
    NONCE_BYTES,
    TAG_BYTES,
    WRAPPED_BLOB_BYTES,
    CryptoError,
    DecryptionError,
    KeyRing,
    UnknownKeyError,
    WrappedKey,
    generate_data_key,
    rewrap_key,
    unwrap_key,
    wrap_key,
    write_private_file,
)

logger = logging.getLogger(__name__)

MAGIC = b"MODSNAP\x00"
FORMAT = 1
SUFFIX = ".snapshot"
MAX_HEADER_BYTES = 64 * 1024
CHUNK_BYTES = 16 * 1024 * 1024
"""Streaming unit for encryption, decryption, hashing and copying, bytes."""

_AAD_PREFIX = b"moderation/snapshot/v1\x00"
_HEADER_KEYS = frozenset(
    {"format", "snapshot_id", "version", "encoder_id", "created_at", "key_id", "wrapped_key"}
)
_SNAPSHOT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Buffer = bytes | bytearray | memoryview


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
    """The context binding a snapshot's wrapped data key (:func:`moderation.crypto.wrap_key`)."""
    return _canonical(["snapshot", snapshot_id, version, encoder_id]).decode("utf-8")


def _check_identity(snapshot_id: str, version: int) -> None:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID_RE.fullmatch(snapshot_id):
        raise ValueError(
            f"invalid snapshot id {snapshot_id!r}: 1-128 characters from A-Z a-z 0-9 . _ -"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"invalid snapshot version {version!r}: a non-negative integer")


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _payload_aad(header: Mapping[str, Any]) -> bytes:
    bound = {k: header[k] for k in ("format", "snapshot_id", "version", "encoder_id", "created_at")}
    return _AAD_PREFIX + _canonical(bound)


def _file_parts(
    header: Mapping[str, Any], body: Iterator[Buffer], update: Callable[[Buffer], object]
) -> Iterator[Buffer]:
    header_bytes = _canonical(header)
    for part in (MAGIC, struct.pack(">I", len(header_bytes)), header_bytes):
        update(part)
        yield part
    for chunk in body:
        update(chunk)
        yield chunk


def _encrypt_stream(payload: memoryview, data_key: bytes, aad: bytes) -> Iterator[Buffer]:
    nonce = secrets.token_bytes(NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    yield nonce
    out = bytearray(min(CHUNK_BYTES, len(payload)))
    out_view = memoryview(out)
    for start in range(0, len(payload), CHUNK_BYTES):
        chunk = payload[start : start + CHUNK_BYTES]
        written = encryptor.update_into(chunk, out)
        yield out_view[:written]
    encryptor.finalize()
    yield encryptor.tag


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
    header: dict[str, Any] = {
        "format": FORMAT,
        "snapshot_id": snapshot_id,
        "version": version,
        "encoder_id": encoder_id,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key_id": wrapped.key_id,
        "wrapped_key": base64.b64encode(wrapped.blob).decode("ascii"),
    }
    view = memoryview(payload).cast("B")
    hasher = hashlib.sha256()
    body = _encrypt_stream(view, data_key, _payload_aad(header))
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_file(path, _file_parts(header, body, hasher.update))
    except OSError as exc:
        raise _error(path, f"cannot write: {exc}", snapshot_id, version) from exc
    size = len(MAGIC) + 4 + len(_canonical(header)) + NONCE_BYTES + len(view) + TAG_BYTES
    logger.info(
        "wrote snapshot %s version %d (%d bytes, master key %s) to %s",
        snapshot_id,
        version,
        size,
        wrapped.key_id,
        path,
    )
    return SnapshotFile(
        path=path,
        snapshot_id=snapshot_id,
        version=version,
        encoder_id=encoder_id,
        key_id=wrapped.key_id,
        sha256=hasher.hexdigest(),
        size_bytes=size,
    )


def _read_exact(handle: BufferedReader, count: int) -> bytes:
    data = handle.read(count)
    if len(data) != count:
        raise ValueError(f"file ends early: wanted {count} bytes, got {len(data)}")
    return data


def _parse_header(handle: BufferedReader, size: int) -> tuple[dict[str, Any], int]:
    """Validated header and the offset of the body. Raises ValueError with the cause."""
    if size < len(MAGIC) + 4:
        raise ValueError(f"file is {size} bytes, too short for a snapshot")
    if _read_exact(handle, len(MAGIC)) != MAGIC:
        raise ValueError("bad magic: not a snapshot file, or corrupted")
    (header_len,) = struct.unpack(">I", _read_exact(handle, 4))
    if header_len > MAX_HEADER_BYTES or len(MAGIC) + 4 + header_len > size:
        raise ValueError(f"header length {header_len} is implausible for a {size}-byte file")
    raw = _read_exact(handle, header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        found = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"header fields are {found}, expected {sorted(_HEADER_KEYS)}")
    if header["format"] != FORMAT or isinstance(header["format"], bool):
        raise ValueError(f"unsupported snapshot format {header['format']!r}")
    for name in ("snapshot_id", "encoder_id", "created_at", "key_id", "wrapped_key"):
        if not isinstance(header[name], str):
            raise ValueError(f"header field {name!r} is not a string")
    if isinstance(header["version"], bool) or not isinstance(header["version"], int):
        raise ValueError("header field 'version' is not an integer")
    # Equal parsed values could hide a changed byte (whitespace, escapes); the file must be
    # exactly what the writer produces, so every byte is checked.
    if _canonical(header) != raw:
        raise ValueError("header is not in canonical form (altered bytes)")
    return header, len(MAGIC) + 4 + header_len


def _wrapped_key(header: Mapping[str, Any]) -> WrappedKey:
    encoded = header["wrapped_key"]
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("header field 'wrapped_key' is not valid base64") from None
    if len(blob) != WRAPPED_BLOB_BYTES or base64.b64encode(blob).decode("ascii") != encoded:
        raise ValueError("header field 'wrapped_key' is malformed")
    try:
        return WrappedKey(header["key_id"], blob)
    except ValueError as exc:
        raise ValueError(f"header field 'key_id': {exc}") from None


def _sha256_file(handle: BufferedReader) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    while count := handle.readinto(buffer):
        hasher.update(view[:count])
    return hasher.hexdigest()


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
            header, _ = _parse_header(handle, size)
            _wrapped_key(header)
    except (OSError, ValueError) as exc:
        raise _error(path, str(exc), None, None) from exc
    return dict(header)


def _fstat_size(handle: BufferedReader) -> int:
    # The open inode's size: stays right if the path is replaced (rotation) meanwhile.
    return os.fstat(handle.fileno()).st_size


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
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _error(path, f"cannot open: {exc.strerror}", *label) from exc
    with handle:
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
                try:
                    handle.seek(0)
                    _check_digest(path, _sha256_file(handle), expected_sha256, label)
                except OSError:
                    pass  # the first error says more than a failed re-read
            raise
        if hasher is not None and expected_sha256 is not None:
            try:
                _check_digest(path, hasher.hexdigest(), expected_sha256, label)
            except SnapshotError:
                _wipe(plaintext)
                raise
        return plaintext


def _check_digest(path: Path, actual: str, expected: str, label: tuple[str, int]) -> None:
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
    try:
        size = _fstat_size(handle)
        header, body_offset = _parse_header(handle, size)
        wrapped = _wrapped_key(header)
    except (OSError, ValueError) as exc:
        raise _error(path, str(exc), *label) from exc
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
        return _decrypt_body(handle, size, body_offset, data_key, _payload_aad(header), hasher)
    except (OSError, ValueError, CryptoError) as exc:
        raise _error(path, str(exc), *label) from exc


def _decrypt_body(
    handle: BufferedReader, size: int, offset: int, data_key: bytes, aad: bytes, hasher: Any
) -> memoryview:
    length = size - offset - NONCE_BYTES - TAG_BYTES
    if length < 0:
        raise ValueError("file ends before the ciphertext's nonce and tag")
    handle.seek(0)
    head = _read_exact(handle, offset + NONCE_BYTES)
    nonce = head[offset:]
    handle.seek(size - TAG_BYTES)
    tag = _read_exact(handle, TAG_BYTES)
    handle.seek(offset + NONCE_BYTES)
    decryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    plaintext = np.empty(length, dtype=np.uint8)
    out = plaintext.data
    # Two ciphertext buffers: one is hashed on the second thread while the next is read and
    # decrypted into the other; a buffer is reused only once its hashing has finished.
    buffers = [bytearray(min(CHUNK_BYTES, length)) for _ in range(2 if hasher else 1)]
    pending: list[Future[None] | None] = [None] * len(buffers)
    position = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-sha256") as pool:
        if hasher is not None:
            hasher.update(head)
        try:
            turn = 0
            while position < length:
                slot = turn % len(buffers)
                turn += 1
                previous = pending[slot]
                if previous is not None:
                    previous.result()
                want = min(CHUNK_BYTES, length - position)
                chunk = memoryview(buffers[slot])[:want]
                got = handle.readinto(chunk)
                if got != want:
                    raise ValueError("file shrank while being read")
                if hasher is not None:
                    pending[slot] = pool.submit(hasher.update, chunk)
                position += decryptor.update_into(chunk, out[position : position + want])
            for future in pending:
                if future is not None:
                    future.result()
            if hasher is not None:
                hasher.update(tag)
            decryptor.finalize()
        except InvalidTag:
            _wipe(out)
            raise DecryptionError(
                "the payload does not authenticate (altered ciphertext, nonce, tag or header "
                "fields)"
            ) from None
        except BaseException:
            _wipe(out)
            raise
        finally:
            out.release()
    return plaintext.data


def _wipe(view: memoryview) -> None:
    # Unauthenticated plaintext must not linger, even in memory that is about to be freed.
    np.frombuffer(view, dtype=np.uint8)[:] = 0


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
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _error(path, f"cannot open: {exc.strerror}", None, None) from exc
    with handle:
        try:
            size = _fstat_size(handle)
            header, body_offset = _parse_header(handle, size)
            wrapped = _wrapped_key(header)
        except (OSError, ValueError) as exc:
            raise _error(path, str(exc), None, None) from exc
        label = (header["snapshot_id"], header["version"])
        context = key_context(header["snapshot_id"], header["version"], header["encoder_id"])
        try:
            rewrapped = rewrap_key(wrapped, keyring, context=context)
        except CryptoError as exc:
            raise _error(path, f"cannot re-wrap its data key: {exc}", *label) from exc
        if rewrapped is wrapped:
            handle.seek(0)
            digest = _sha256_file(handle)
            new_header: dict[str, Any] = header
            new_size = size
        else:
            new_header = {
                **header,
                "key_id": rewrapped.key_id,
                "wrapped_key": base64.b64encode(rewrapped.blob).decode("ascii"),
            }
            hasher = hashlib.sha256()
            body = _copy_stream(handle, body_offset, size - body_offset)
            try:
                write_private_file(path, _file_parts(new_header, body, hasher.update))
            except (OSError, ValueError) as exc:
                raise _error(path, f"cannot rewrite: {exc}", *label) from exc
            digest = hasher.hexdigest()
            new_size = len(MAGIC) + 4 + len(_canonical(new_header)) + size - body_offset
            logger.info(
                "re-wrapped snapshot %s version %d from master key %s to %s",
                header["snapshot_id"],
                header["version"],
                wrapped.key_id,
                rewrapped.key_id,
            )
    return SnapshotFile(
        path=path,
        snapshot_id=new_header["snapshot_id"],
        version=new_header["version"],
        encoder_id=new_header["encoder_id"],
        key_id=new_header["key_id"],
        sha256=digest,
        size_bytes=new_size,
    )


def _copy_stream(handle: BufferedReader, offset: int, length: int) -> Iterator[Buffer]:
    handle.seek(offset)
    remaining = length
    while remaining:
        data = handle.read(min(CHUNK_BYTES, remaining))
        if not data:
            raise ValueError("file shrank while being copied")
        remaining -= len(data)
        yield data


# --- payload codec ------------------------------------------------------------------------------

PAYLOAD_MAGIC = b"MODPAYL\x00"
PAYLOAD_FORMAT = 1
PAYLOAD_ALIGN = 64
"""Array data offsets are multiples of this many bytes (a cache line; enough for any SIMD load)."""
MAX_PAYLOAD_HEADER_BYTES = 16 * 1024 * 1024

# Plain numeric, boolean, fixed-width string and datetime dtypes: nothing that holds Python
# objects, so decoding can never run code.
_ALLOWED_KINDS = frozenset("biufcSUmM")
_DTYPE_RE = re.compile(r"[<>|][biufcSUmM][0-9]{1,5}(\[[0-9]*[a-zA-Z]{1,3}\])?")


def _check_dtype(dtype: np.dtype[Any], name: str) -> None:
    if (
        dtype.hasobject
        or dtype.kind not in _ALLOWED_KINDS
        or dtype.fields is not None
        or dtype.itemsize == 0
    ):
        raise ValueError(
            f"array {name!r} has dtype {dtype}: only plain numeric, bool, fixed-width string "
            "and datetime dtypes are stored (no object, void or structured arrays)"
        )


def encode_payload(arrays: Mapping[str, np.ndarray[Any, Any]], meta: Mapping[str, Any]) -> bytes:
    """Serialise named arrays and JSON metadata into one buffer, without pickle.

    Layout: ``PAYLOAD_MAGIC (8) || header_len (8, big-endian) || header JSON || array data``;
    the header lists each array's name, dtype (``dtype.str``, byte order included), shape,
    offset and byte length; each array's C-order bytes start at a multiple of
    :data:`PAYLOAD_ALIGN`. The array bytes are copied once, into the result.

    Args:
        arrays: name -> array of any shape (empty included) with a numeric, bool, ``S``,
            ``U``, ``m`` or ``M`` dtype.
        meta: JSON-serialisable mapping (tuples come back as lists; NaN is refused).

    Raises:
        ValueError: an object, void or structured dtype, or ``meta`` that is not strict JSON.
        TypeError: ``meta`` holds a value JSON cannot encode.
    """
    entries: list[dict[str, Any]] = []
    datas: list[np.ndarray[Any, Any]] = []
    for name, array in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings, got {name!r}")
        array = np.asarray(array)
        _check_dtype(array.dtype, name)
        contiguous = np.ascontiguousarray(array)
        entries.append(
            {"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "nbytes": 0}
        )
        datas.append(contiguous)
    # Offsets depend on the header's length, which depends on the offsets' digits: fix the
    # header size by giving every entry its final nbytes and padding the header to alignment.
    for entry, data in zip(entries, datas, strict=True):
        entry["nbytes"] = int(data.nbytes)
    header_len = 0
    while True:
        offset = _align(len(PAYLOAD_MAGIC) + 8 + header_len)
        for entry in entries:
            entry["offset"] = offset
            offset = _align(offset + entry["nbytes"])
        header = _canonical(
            {"format": PAYLOAD_FORMAT, "meta": _strict_json(meta), "arrays": entries}
        )
        if len(header) <= header_len:
            break
        header_len = len(header)
    header = header.ljust(header_len, b" ")
    parts: list[Buffer] = [PAYLOAD_MAGIC, struct.pack(">Q", header_len), header]
    position = len(PAYLOAD_MAGIC) + 8 + header_len
    for entry, data in zip(entries, datas, strict=True):
        parts.append(bytes(entry["offset"] - position))
        # reshape(-1) of a C-contiguous array is a view; uint8 exposes any dtype as a buffer.
        parts.append(data.reshape(-1).view(np.uint8).data)
        position = entry["offset"] + entry["nbytes"]
    return b"".join(parts)


def _align(offset: int) -> int:
    return -(-offset // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def _strict_json(meta: Mapping[str, Any]) -> Any:
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"meta is not strict JSON: {exc}") from None


def decode_payload(data: Buffer) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    """Inverse of :func:`encode_payload`. Never unpickles anything.

    Returns:
        ``(arrays, meta)``: the arrays are views into ``data`` (zero-copy; read-only when
        ``data`` is ``bytes``, writable when it is a ``bytearray``).

    Raises:
        ValueError: not a payload, a malformed header, an unsupported dtype (object arrays
            included), or offsets and lengths that do not fit the data.
    """
    view = memoryview(data).cast("B")
    start = len(PAYLOAD_MAGIC) + 8
    if len(view) < start or bytes(view[: len(PAYLOAD_MAGIC)]) != PAYLOAD_MAGIC:
        raise ValueError("not an index payload (bad magic)")
    (header_len,) = struct.unpack(">Q", view[len(PAYLOAD_MAGIC) : start])
    if header_len > MAX_PAYLOAD_HEADER_BYTES or start + header_len > len(view):
        raise ValueError(f"payload header length {header_len} does not fit")
    try:
        header = json.loads(bytes(view[start : start + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"payload header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"unsupported payload format {header!r:.80}")
    meta, entries = header.get("meta"), header.get("arrays")
    if not isinstance(meta, dict) or not isinstance(entries, list):
        raise ValueError("payload header needs 'meta' (object) and 'arrays' (list)")
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    position = start + header_len
    for entry in entries:
        name, array, position = _decode_entry(view, entry, position)
        if name in arrays:
            raise ValueError(f"array {name!r} appears twice")
        arrays[name] = array
    if position != len(view):
        raise ValueError(f"{len(view) - position} unexpected bytes after the last array")
    return arrays, meta


def _decode_entry(
    view: memoryview, entry: object, position: int
) -> tuple[str, np.ndarray[Any, Any], int]:
    if not isinstance(entry, dict):
        raise ValueError("array entry is not an object")
    name, descr, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    offset, nbytes = entry.get("offset"), entry.get("nbytes")
    if not isinstance(name, str) or not isinstance(descr, str) or not _DTYPE_RE.fullmatch(descr):
        raise ValueError(f"array entry has a bad name or dtype: {entry!r:.200}")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        and isinstance(offset, int)
        and isinstance(nbytes, int)
    ):
        raise ValueError(f"array {name!r} has a bad shape, offset or length")
    dtype = np.dtype(descr)
    _check_dtype(dtype, name)
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes:
        raise ValueError(f"array {name!r}: {nbytes} bytes do not hold shape {shape} of {descr}")
    if offset < position or offset - position >= PAYLOAD_ALIGN or offset + nbytes > len(view):
        raise ValueError(f"array {name!r}: offset {offset} is out of place")
    if count == 0:
        array: np.ndarray[Any, Any] = np.empty(shape, dtype=dtype)
    else:
        array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
    return name, array, offset + nbytes
