"""Envelope encryption: per-object data keys wrapped under the primary master key
(:class:`WrappedKey`, bound to a context naming the object), rotation by re-wrapping, and sealed
blobs (uploads) that crypto-shredding their wrapped key makes unreadable."""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moderation.crypto.aead import NONCE_BYTES, TAG_BYTES, decrypt, encrypt
from moderation.crypto.errors import CryptoError, DecryptionError
from moderation.crypto.keys import KEY_BYTES, KeyRing, check_key_id

WRAPPED_BLOB_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
"""Length of :attr:`WrappedKey.blob`: nonce, encrypted data key, tag."""

_WRAP_AAD_PREFIX = b"moderation/wrapped-key/v1\x00"
_BLOB_AAD_PREFIX = b"moderation/blob/v1\x00"
_WRAPPED_KEY_MAGIC = b"MWK\x01"


def generate_data_key() -> bytes:
    """A fresh random AES-256 data key: 32 bytes from ``os.urandom``."""
    return secrets.token_bytes(KEY_BYTES)


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under the master key ``key_id``.

    ``blob`` is ``nonce (12) || AES-256-GCM ciphertext of the 32-byte data key || tag (16)``,
    60 bytes. Not secret: useless without the master key.
    """

    key_id: str
    blob: bytes

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        if len(self.blob) != WRAPPED_BLOB_BYTES:
            raise ValueError(
                f"wrapped key blob is {len(self.blob)} bytes, expected {WRAPPED_BLOB_BYTES}"
            )

    def to_bytes(self) -> bytes:
        """Self-describing encoding for a DB column: ``b"MWK\\x01" || len(id) (1 byte) || id
        (ASCII) || blob``."""
        key_id = self.key_id.encode("ascii")
        return _WRAPPED_KEY_MAGIC + bytes([len(key_id)]) + key_id + self.blob

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Inverse of :meth:`to_bytes`. Raises :class:`CryptoError` on malformed input."""
        magic_len = len(_WRAPPED_KEY_MAGIC)
        if len(data) < magic_len + 1 or data[:magic_len] != _WRAPPED_KEY_MAGIC:
            raise CryptoError("malformed wrapped key: bad magic or version")
        id_len = data[magic_len]
        id_end = magic_len + 1 + id_len
        if len(data) != id_end + WRAPPED_BLOB_BYTES:
            raise CryptoError(
                f"malformed wrapped key: {len(data)} bytes, expected {id_end + WRAPPED_BLOB_BYTES}"
            )
        try:
            return cls(data[magic_len + 1 : id_end].decode("ascii"), bytes(data[id_end:]))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CryptoError(f"malformed wrapped key: {exc}") from None


def _wrap_aad(key_id: str, context: str) -> bytes:
    if not context:
        raise ValueError("context must name the object the key belongs to")
    kid = key_id.encode("ascii")
    ctx = context.encode("utf-8")
    # Length prefixes keep (id, context) pairs unambiguous whatever characters they hold.
    return _WRAP_AAD_PREFIX + struct.pack(">H", len(kid)) + kid + struct.pack(">I", len(ctx)) + ctx


def wrap_key(data_key: bytes, keyring: KeyRing, *, context: str) -> WrappedKey:
    """Encrypt a 32-byte data key under the primary master key, bound to ``context``.

    Args:
        data_key: from :func:`generate_data_key`.
        context: names the object (e.g. a snapshot id and version, an upload id); the same
            string must be given to :func:`unwrap_key`.

    Raises:
        ValueError: ``data_key`` is not 32 bytes or ``context`` is empty.
    """
    if len(data_key) != KEY_BYTES:
        raise ValueError(f"data key must be {KEY_BYTES} bytes, got {len(data_key)}")
    key_id = keyring.primary_id
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(keyring.get(key_id)).encrypt(nonce, data_key, _wrap_aad(key_id, context))
    return WrappedKey(key_id, nonce + sealed)


def unwrap_key(wrapped: WrappedKey, keyring: KeyRing, *, context: str) -> bytes:
    """Recover the data key. The key id selects the master key; no other key is tried.

    Raises:
        UnknownKeyError: ``wrapped.key_id`` is not in the ring (message names it).
        DecryptionError: authentication failed: another deployment's key bytes under the same id,
            a wrapped key moved from another object (``context`` differs), or corruption.
    """
    master = keyring.get(wrapped.key_id)
    blob = wrapped.blob
    try:
        return AESGCM(master).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _wrap_aad(wrapped.key_id, context)
        )
    except InvalidTag:
        raise DecryptionError(
            f"cannot unwrap the data key of {context}: master key {wrapped.key_id!r} does not "
            "authenticate it (different key bytes under that id, a key moved from another "
            "object, or corruption)"
        ) from None


def rewrap_key(wrapped: WrappedKey, keyring: KeyRing, *, context: str) -> WrappedKey:
    """The same data key wrapped under the ring's current primary (key rotation).

    A key already under the primary is verified and returned unchanged, so rotation can be
    re-run after a crash.

    Raises:
        UnknownKeyError, DecryptionError: as :func:`unwrap_key`.
    """
    data_key = unwrap_key(wrapped, keyring, context=context)
    if wrapped.key_id == keyring.primary_id:
        return wrapped
    return wrap_key(data_key, keyring, context=context)


def _blob_aad(context: str) -> bytes:
    return _BLOB_AAD_PREFIX + context.encode("utf-8")


def seal_blob(
    plaintext: bytes | bytearray | memoryview, keyring: KeyRing, *, context: str
) -> tuple[bytes, WrappedKey]:
    """Encrypt one blob (an upload) under a fresh data key wrapped by the primary master key.

    Both the payload's associated data and the wrap bind ``context`` (e.g. the upload id).
    Store the sealed bytes and the wrapped key apart (blob store, DB row): deleting the wrapped
    key destroys the only copy of the data key, so the blob is unreadable everywhere, backups
    included (crypto-shredding).

    Returns:
        ``(nonce || ciphertext || tag, wrapped data key)``.

    Raises:
        ValueError: empty ``context`` or plaintext over
            :data:`~moderation.crypto.aead.MAX_ONE_SHOT_BYTES`.
    """
    data_key = generate_data_key()
    wrapped = wrap_key(data_key, keyring, context=context)
    return encrypt(plaintext, data_key, _blob_aad(context)), wrapped


def open_blob(
    sealed: bytes | bytearray | memoryview,
    wrapped: WrappedKey,
    keyring: KeyRing,
    *,
    context: str,
) -> bytes:
    """Decrypt a blob from :func:`seal_blob`.

    Raises:
        UnknownKeyError: the wrapping master key was retired.
        DecryptionError: wrong ``context``, a wrapped key from another blob, or tampering.
    """
    data_key = unwrap_key(wrapped, keyring, context=context)
    return decrypt(sealed, data_key, _blob_aad(context), context=context)
