"""Master keys: the :class:`KeyRing` (ids, primary key, rotation), its env-variable and JSON key
file forms, and where a deployment's ring comes from (:func:`load_keyring`)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from moderation.config import ConfigurationError
from moderation.crypto.errors import CryptoError, UnknownKeyError
from moderation.crypto.files import fsync_dir, write_private_file

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

KEY_BYTES = 32
"""AES-256 key length, bytes (master keys and data keys)."""

KEY_FILE_FORMAT = 1
MASTER_KEYS_ENV = "MODERATION_MASTER_KEYS"

# Ids go into the env variable (``kid:key,kid:key``), file names and log lines: keep them plain.
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_KEY_FILE_BYTES = 1024 * 1024


def check_key_id(key_id: str) -> None:
    """Refuse a key id that could not go into the env variable, a file name or a log line.

    Raises:
        ValueError: ``key_id`` is not 1-64 characters of ``[A-Za-z0-9._-]`` starting with a
            letter or digit.
    """
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
            check_key_id(key_id)
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
                check_key_id(key_id)
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
        check_key_id(key_id)
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
    fsync_dir(path.parent)
    logger.warning(
        "DEVELOPMENT ONLY: generated master key %s in %s. Anyone with this file can decrypt "
        "the blocklist and uploads, and losing it loses them. In production set %s or provide "
        "a managed key file.",
        ring.primary_id,
        path,
        MASTER_KEYS_ENV,
    )
