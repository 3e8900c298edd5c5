"""The errors raised by the key ring and by encryption and decryption."""

from __future__ import annotations


class CryptoError(Exception):
    """A key is missing or a ciphertext does not authenticate."""


class UnknownKeyError(CryptoError):
    """The key id is not in the key ring (retired, mistyped, or another deployment's)."""

    def __init__(self, key_id: str, detail: str = "") -> None:
        message = f"master key {key_id!r} is not in the key ring"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.key_id = key_id


class DecryptionError(CryptoError):
    """AES-GCM authentication failed: wrong key, wrong associated data, or tampered bytes."""
