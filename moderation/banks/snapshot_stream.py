"""Chunked AES-256-GCM streams for snapshot bodies: encryption while writing, decryption
with the file's SHA-256 computed on a second thread, plain copies and hashes of files.

Chunking lets payloads exceed the 2 GiB one-shot limit of ``cryptography``'s AEAD API; the
file layout around these streams is :mod:`moderation.banks.snapshot`'s.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from io import BufferedReader
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from moderation.banks.payload import Buffer
from moderation.crypto.aead import NONCE_BYTES, TAG_BYTES
from moderation.crypto.errors import DecryptionError

CHUNK_BYTES = 16 * 1024 * 1024
"""Streaming unit for encryption, decryption, hashing and copying, bytes."""


def encrypt_stream(payload: memoryview, data_key: bytes, aad: bytes) -> Iterator[Buffer]:
    """Yield ``nonce (12 bytes) || ciphertext || tag (16 bytes)`` of ``payload`` under
    ``data_key`` (AES-256-GCM, fresh random nonce), one :data:`CHUNK_BYTES` chunk at a time.

    The yielded ciphertext views share one buffer: consume each before asking for the next.
    """
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


def read_exact(handle: BufferedReader, count: int) -> bytes:
    """The next ``count`` bytes of ``handle``. Raises ValueError when the file ends first."""
    data = handle.read(count)
    if len(data) != count:
        raise ValueError(f"file ends early: wanted {count} bytes, got {len(data)}")
    return data


def sha256_file(handle: BufferedReader) -> str:
    """Hex SHA-256 of ``handle`` from its current position to the end, read in chunks."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    while count := handle.readinto(buffer):
        hasher.update(view[:count])
    return hasher.hexdigest()


def decrypt_body(
    handle: BufferedReader, size: int, offset: int, data_key: bytes, aad: bytes, hasher: Any
) -> memoryview:
    """Decrypt and authenticate the body of a ``size``-byte snapshot file whose nonce starts at
    ``offset``, feeding the whole file to ``hasher`` (a ``hashlib`` object, or None) on the way.

    Returns:
        The plaintext as a writable byte ``memoryview`` over new, not zero-filled memory.

    Raises:
        ValueError: the file is too short or shrinks while being read.
        DecryptionError: the payload does not authenticate (the plaintext is wiped first).
    """
    length = size - offset - NONCE_BYTES - TAG_BYTES
    if length < 0:
        raise ValueError("file ends before the ciphertext's nonce and tag")
    handle.seek(0)
    head = read_exact(handle, offset + NONCE_BYTES)
    nonce = head[offset:]
    handle.seek(size - TAG_BYTES)
    tag = read_exact(handle, TAG_BYTES)
    handle.seek(offset + NONCE_BYTES)
    decryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    plaintext = np.empty(length, dtype=np.uint8)
    out = plaintext.data
    # Two ciphertext buffers: one is hashed on the second thread while the next is read and
    # decrypted into the other; a buffer is reused only once its hashing has finished.
    buffers = [bytearray(min(CHUNK_BYTES, length)) for _ in range(2 if hasher else 1)]
    pending: list[Future[None] | None] = [None] * len(buffers)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-sha256") as pool:
        if hasher is not None:
            hasher.update(head)
        try:
            _decrypt_chunks(handle, decryptor, out, buffers, pending, pool, hasher)
            for future in pending:
                if future is not None:
                    future.result()
            if hasher is not None:
                hasher.update(tag)
            decryptor.finalize()
        except InvalidTag:
            wipe(out)
            raise DecryptionError(
                "the payload does not authenticate (altered ciphertext, nonce, tag or header "
                "fields)"
            ) from None
        except BaseException:
            wipe(out)
            raise
        finally:
            out.release()
    return plaintext.data


def _decrypt_chunks(
    handle: BufferedReader,
    decryptor: Any,
    out: memoryview,
    buffers: list[bytearray],
    pending: list[Future[None] | None],
    pool: ThreadPoolExecutor,
    hasher: Any,
) -> None:
    """Read and decrypt ``len(out)`` bytes of ciphertext into ``out``, taking the buffers in
    turn; each one's hashing is submitted to ``pool`` and awaited before it is reused."""
    length = len(out)
    position = 0
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


def wipe(view: memoryview) -> None:
    """Overwrite the byte ``view`` with zeros."""
    # Unauthenticated plaintext must not linger, even in memory that is about to be freed.
    np.frombuffer(view, dtype=np.uint8)[:] = 0


def copy_stream(handle: BufferedReader, offset: int, length: int) -> Iterator[Buffer]:
    """Yield ``length`` bytes of ``handle`` from ``offset`` in chunks. Raises ValueError when
    the file turns out shorter."""
    handle.seek(offset)
    remaining = length
    while remaining:
        data = handle.read(min(CHUNK_BYTES, remaining))
        if not data:
            raise ValueError("file shrank while being copied")
        remaining -= len(data)
        yield data
