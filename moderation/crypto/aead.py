"""One-shot AES-256-GCM (NIST SP 800-38D) under a data key: ``nonce || ciphertext || tag``."""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moderation.crypto.errors import DecryptionError
from moderation.crypto.keys import KEY_BYTES

NONCE_BYTES = 12
"""GCM nonce length, bytes: the 96-bit IV recommended by NIST SP 800-38D §5.2.1.1."""
TAG_BYTES = 16
"""GCM authentication tag length, bytes (the full 128-bit tag)."""
MAX_ONE_SHOT_BYTES = 2**31 - 1
"""Largest plaintext :func:`encrypt` takes: ``cryptography``'s one-shot AEAD limit. Larger
payloads (index snapshots) use the streaming writer in :mod:`moderation.banks.snapshot`."""


def encrypt(plaintext: bytes | bytearray | memoryview, data_key: bytes, aad: bytes) -> bytes:
    """AES-256-GCM under ``data_key`` with a fresh random nonce.

    Returns:
        ``nonce (12) || ciphertext (len(plaintext)) || tag (16)``.

    Raises:
        ValueError: ``data_key`` is not 32 bytes, or the plaintext exceeds
            :data:`MAX_ONE_SHOT_BYTES` (index snapshots stream through their own writer).
    """
    if len(data_key) != KEY_BYTES:
        raise ValueError(f"data key must be {KEY_BYTES} bytes, got {len(data_key)}")
    if memoryview(plaintext).nbytes > MAX_ONE_SHOT_BYTES:
        raise ValueError(f"plaintext larger than {MAX_ONE_SHOT_BYTES} bytes; stream it instead")
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def decrypt(
    sealed: bytes | bytearray | memoryview, data_key: bytes, aad: bytes, *, context: str
) -> bytes:
    """Inverse of :func:`encrypt`; the ciphertext is sliced, not copied.

    Args:
        context: names the object in the error message.

    Raises:
        DecryptionError: too short, or authentication failed (wrong key or associated data,
            tampered bytes); the message names ``context``.
    """
    view = memoryview(sealed).cast("B")
    if len(view) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"cannot decrypt {context}: {len(view)} bytes is too short")
    try:
        return AESGCM(data_key).decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionError(
            f"cannot decrypt {context}: authentication failed (wrong key or associated data, "
            "or the ciphertext was altered)"
        ) from None
