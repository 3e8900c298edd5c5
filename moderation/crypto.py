"""Envelope encryption: master keys with ids, per-object data keys, AES-256-GCM, rotation.

Every encrypted object (an index snapshot, an upload blob) has its own 32-byte data key. The
payload is sealed with AES-256-GCM under that data key; the data key is *wrapped* (itself
encrypted with AES-256-GCM) under the primary master key of the :class:`KeyRing`. The wrap's
associated data binds the master key id and a caller-given context naming the object, so a
wrapped key cannot be moved to another object, and a key id never selects the wrong key.

Rotation adds a new master key, makes it primary and re-wraps the (small) wrapped keys; payloads
are never re-encrypted. Retiring a master key makes everything still wrapped under it unreadable,
and destroying one object's wrapped key makes that object unreadable (crypto-shredding, used for
GDPR erasure of uploads), backups included.

Algorithms: AES-GCM as specified in NIST SP 800-38D, via the ``cryptography`` package (OpenSSL).
Nonces are 12 random bytes (SP 800-38D §8.2.2, random construction); a data key encrypts one
snapshot or one blob, so the 2**32 invocation bound of §8.3 is far away.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moderation.config import ConfigurationError

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

KEY_BYTES = 32
"""AES-256 key length, bytes (master keys and data keys)."""
NONCE_BYTES = 12
"""GCM nonce length, bytes: the 96-bit IV recommended by NIST SP 800-38D §5.2.1.1."""
TAG_BYTES = 16
"""GCM authentication tag length, bytes (the full 128-bit tag)."""
WRAPPED_BLOB_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
"""Length of :attr:`WrappedKey.blob`: nonce, encrypted data key, tag."""
MAX_ONE_SHOT_BYTES = 2**31 - 1
"""Largest plaintext :func:`encrypt` takes: ``cryptography``'s one-shot AEAD limit. Larger
payloads (index snapshots) use the streaming writer in :mod:`moderation.banks.snapshot`."""

KEY_FILE_FORMAT = 1
MASTER_KEYS_ENV = "MODERATION_MASTER_KEYS"

# Ids go into the env variable (``kid:key,kid:key``), file names and log lines: keep them plain.
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WRAP_AAD_PREFIX = b"moderation/wrapped-key/v1\x00"
_BLOB_AAD_PREFIX = b"moderation/blob/v1\x00"
_WRAPPED_KEY_MAGIC = b"MWK\x01"
_MAX_KEY_FILE_BYTES = 1024 * 1024


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


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError(
            f"invalid key id {key_id!r}: 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


def _new_key_id(prefix: str) -> str:
    # A date tells operators how old a key is; the random part keeps ids unique across hosts.
    return f"{prefix}-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


class KeyRing:
    """Master keys by id, one of them primary (new data keys are wrapped under it).

    Immutable: rotation returns a new ring. ``repr`` shows ids only, never key bytes.

    Args:
        keys: key id -> 32 key bytes; ids match ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.
        primary: the id that wraps new data keys.

    Raises:
        ValueError: an invalid id, a key that is not 32 bytes, an empty ring, or a primary
            id that is not in ``keys``.
    """

    def __init__(self, keys: Mapping[str, bytes], primary: str) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one master key")
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValueError(f"master key {key_id!r} must be {KEY_BYTES} bytes")
        if primary not in keys:
            raise ValueError(f"primary key {primary!r} is not in the key ring")
        self._keys: Mapping[str, bytes] = MappingProxyType(dict(keys))
        self._primary = primary

    @property
    def primary_id(self) -> str:
        """Id of the key that wraps new data keys."""
        return self._primary

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, in insertion order (a rotated-in key comes last)."""
        return tuple(self._keys)

    def get(self, key_id: str) -> bytes:
        """The 32 key bytes of ``key_id``. Raises :class:`UnknownKeyError` naming the id."""
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(key_id, f"known ids: {', '.join(self._keys)}") from None

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyRing):
            return NotImplemented
        return self._primary == other._primary and dict(self._keys) == dict(other._keys)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KeyRing(primary_id={self._primary!r}, key_ids={self.key_ids!r})"

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyRing:
        """A ring holding one fresh random key (``os.urandom``), which is primary."""
        key_id = key_id or _new_key_id("k")
        return cls({key_id: secrets.token_bytes(KEY_BYTES)}, key_id)

    @classmethod
    def from_env_value(cls, value: str) -> KeyRing:
        """Parse ``kid:base64(32 bytes)[,kid2:base64(...)]``; the first key is primary.

        Whitespace around entries is ignored. Generate a key with
        ``python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"``.

        Raises:
            ConfigurationError: empty value, an entry without ``:``, an invalid or duplicate id,
                a key that is not standard base64 of exactly 32 bytes. Messages name the entry's
                position and id, never key material.
        """
        where = MASTER_KEYS_ENV
        entries = [entry.strip() for entry in value.split(",")]
        if not any(entries):
            raise ConfigurationError(f"{where} is empty; expected kid:base64key[,kid2:base64key]")
        keys: dict[str, bytes] = {}
        for position, entry in enumerate(entries, start=1):
            if not entry:
                raise ConfigurationError(f"{where}: entry {position} is empty (stray comma?)")
            key_id, sep, encoded = entry.partition(":")
            key_id = key_id.strip()
            if not sep:
                raise ConfigurationError(
                    f"{where}: entry {position} has no ':'; expected kid:base64key"
                )
            label = f"{where}: entry {position} (key id {key_id!r})"
            try:
                _check_key_id(key_id)
            except ValueError as exc:
                raise ConfigurationError(f"{where}: entry {position}: {exc}") from None
            if key_id in keys:
                raise ConfigurationError(f"{label}: duplicate key id")
            keys[key_id] = _decode_key(encoded.strip(), label)
        return cls(keys, next(iter(keys)))

    @classmethod
    def load_file(cls, path: Path) -> KeyRing:
        """Read a JSON key file written by :meth:`save_file`.

        Format: ``{"format": 1, "primary": "kid", "keys": {"kid": "base64(32 bytes)", ...}}``.

        Raises:
            ConfigurationError: the file is missing, not a regular file, readable or writable by
                group or others (POSIX; ``chmod 600`` fixes it), not valid JSON, or not a valid
                key ring. Messages name the file, never key material.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ConfigurationError(f"key file {path}: cannot open: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError(f"key file {path}: not a regular file")
            if os.name == "posix" and info.st_mode & 0o077:
                raise ConfigurationError(
                    f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: it must not be "
                    "accessible by group or others; run: chmod 600 " + str(path)
                )
            raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
        if len(raw) > _MAX_KEY_FILE_BYTES:
            raise ConfigurationError(f"key file {path}: larger than {_MAX_KEY_FILE_BYTES} bytes")
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"key file {path}: not valid JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
            raise ConfigurationError(
                f'key file {path}: expected a JSON object with "format": {KEY_FILE_FORMAT}'
            )
        primary, encoded_keys = document.get("primary"), document.get("keys")
        if not isinstance(primary, str) or not isinstance(encoded_keys, dict) or not encoded_keys:
            raise ConfigurationError(
                f'key file {path}: needs "primary" (a key id) and a non-empty "keys" object'
            )
        keys: dict[str, bytes] = {}
        for key_id, encoded in encoded_keys.items():
            label = f"key file {path}: key {key_id!r}"
            if not isinstance(encoded, str):
                raise ConfigurationError(f"{label}: value must be a base64 string")
            keys[key_id] = _decode_key(encoded, label)
        try:
            return cls(keys, primary)
        except ValueError as exc:
            raise ConfigurationError(f"key file {path}: {exc}") from None

    def save_file(self, path: Path) -> None:
        """Write the ring as JSON to ``path``: mode 0600, atomically (temp file + ``os.replace``).

        A reader sees either the old file or the new one, never a partial file.

        Raises:
            OSError: the directory is missing or not writable.
        """
        write_private_file(Path(path), [self._to_json()])

    def _to_json(self) -> bytes:
        document = {
            "format": KEY_FILE_FORMAT,
            "primary": self._primary,
            "keys": {kid: base64.b64encode(key).decode("ascii") for kid, key in self._keys.items()},
        }
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"

    def with_new_primary(self, key_id: str | None = None) -> KeyRing:
        """A copy with a freshly generated key (``os.urandom``) added and made primary.

        Persist the new ring (:meth:`save_file`) *before* wrapping anything under the new key:
        otherwise a crash leaves data wrapped under a key that exists nowhere.

        Args:
            key_id: the new key's id; default ``k-<YYYYMMDD>-<8 hex>``.

        Raises:
            ValueError: ``key_id`` is invalid or already in the ring.
        """
        key_id = key_id or _new_key_id("k")
        _check_key_id(key_id)
        if key_id in self._keys:
            raise ValueError(f"key id {key_id!r} is already in the key ring")
        keys = dict(self._keys)
        keys[key_id] = secrets.token_bytes(KEY_BYTES)
        logger.info("generated master key %s; it is now primary", key_id)
        return KeyRing(keys, key_id)

    def without(self, key_id: str) -> KeyRing:
        """A copy with ``key_id`` retired: whatever is still wrapped under it becomes unreadable.

        Raises:
            UnknownKeyError: ``key_id`` is not in the ring.
            CryptoError: ``key_id`` is the primary (rotate first).
        """
        self.get(key_id)
        if key_id == self._primary:
            raise CryptoError(
                f"cannot retire master key {key_id!r}: it is the primary; rotate to a new "
                "primary and re-wrap first"
            )
        return KeyRing({k: v for k, v in self._keys.items() if k != key_id}, self._primary)


def _decode_key(encoded: str, label: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{label}: key is not valid standard base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"{label}: key decodes to {len(key)} bytes, expected {KEY_BYTES} (AES-256)"
        )
    return key


def write_private_file(path: Path, parts: Iterable[bytes | bytearray | memoryview]) -> None:
    """Atomically write ``parts`` to ``path`` with mode 0600 and fsync it.

    The bytes go to a new temp file in the same directory (``O_EXCL``, mode 0600), which is
    fsynced, renamed over ``path`` with ``os.replace`` and the directory fsynced, so readers see
    the old file or the new one, never a partial file. Used for key files and ciphertext; nothing
    goes through :mod:`tempfile` or the system temp directory. ``parts`` may be a generator
    producing the content piece by piece (each piece is written before the next is requested).

    Raises:
        OSError: the directory is missing or not writable, or the disk is full (the temp file
            is removed).
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            for part in parts:
                view = memoryview(part).cast("B")
                written = 0
                while written < len(view):
                    written += handle.write(view[written:]) or 0
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable (POSIX); directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_keyring(settings: Settings, *, create_dev: bool = False) -> KeyRing:
    """The deployment's master keys.

    Sources, in order: ``MODERATION_MASTER_KEYS`` (``settings.master_keys``); else the key file
    at ``settings.key_file_path`` (default ``<data_dir>/keys.json``); else, only when
    ``create_dev`` is true (``moderation init``), a newly generated development key file (mode
    0600, never overwriting an existing one), announced with a WARNING log.

    Raises:
        ConfigurationError: no keys and ``create_dev`` false; a malformed env value; a key file
            that is malformed or accessible by group or others.
    """
    if settings.master_keys is not None:
        ring = KeyRing.from_env_value(settings.master_keys.get_secret_value())
        if settings.key_file_path.exists():
            logger.warning(
                "%s is set, so the key file %s is ignored", MASTER_KEYS_ENV, settings.key_file_path
            )
        logger.info(
            "master keys from %s: %s (primary %s)",
            MASTER_KEYS_ENV,
            ", ".join(ring.key_ids),
            ring.primary_id,
        )
        return ring
    path = settings.key_file_path
    if not path.exists() and create_dev:
        _create_dev_key_file(path)
    if path.exists():
        ring = KeyRing.load_file(path)
        logger.info(
            "master keys from %s: %s (primary %s)", path, ", ".join(ring.key_ids), ring.primary_id
        )
        return ring
    raise ConfigurationError(
        f"no master keys: set {MASTER_KEYS_ENV}=kid:base64key (32 bytes) or provide the key file "
        f"{path} (mode 0600); `moderation init` creates a development key file"
    )


def _create_dev_key_file(path: Path) -> None:
    ring = KeyRing.generate(_new_key_id("dev"))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    write_private_file(temp, [ring._to_json()])
    try:
        # link() fails if the file appeared meanwhile: never overwrite someone's keys.
        os.link(temp, path)
    except FileExistsError:
        return
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    logger.warning(
        "DEVELOPMENT ONLY: generated master key %s in %s. Anyone with this file can decrypt "
        "the blocklist and uploads, and losing it loses them. In production set %s or provide "
        "a managed key file.",
        ring.primary_id,
        path,
        MASTER_KEYS_ENV,
    )


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
        _check_key_id(self.key_id)
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
        ValueError: empty ``context`` or plaintext over :data:`MAX_ONE_SHOT_BYTES`.
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
