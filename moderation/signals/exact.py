"""Exact-hash signals: MD5, SHA-1 and SHA-256 of an upload's bytes, kept only in keyed form.

Hash lists exchanged by NCMEC, StopNCII and ThreatExchange carry cryptographic hashes of the
files themselves (python-threatexchange ``signal_type/md5.py`` ``video_md5``,
``signal_type/sha256.py`` ``video_sha256``; NCMEC fingerprints ``MD5``/``SHA1``). A match is a
byte-identical file, nothing else. A list of such hashes is itself a list of banned files, so the
service never stores one in plaintext: every digest is replaced by
``HMAC-SHA256(key, kind || 0x00 || digest)`` (:func:`keyed`) under a deployment secret wrapped by
the master keys, and matching compares keyed values (RFC 2104 HMAC; the kind is bound in so an
MD5 can never equal a SHA-256 that happens to share bytes).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

#: Supported exact-hash kinds and their digest sizes in bytes.
EXACT_KINDS: Final = ("md5", "sha1", "sha256")
DIGEST_BYTES: Final = {"md5": 16, "sha1": 20, "sha256": 32}
#: Size of a keyed exact hash (HMAC-SHA256 output), bytes.
KEYED_BYTES: Final = 32

#: ``deployment_secrets`` name of the HMAC key for exact hashes.
EXACT_KEY_NAME: Final = "exact-hash-hmac"
#: ``deployment_secrets`` name of the key that seals exact hashes for export (AES-256-GCM).
EXACT_EXPORT_KEY_NAME: Final = "exact-hash-export"


def digests(data: bytes) -> dict[str, bytes]:
    """Every supported digest of ``data``: kind -> raw digest (16, 20 or 32 bytes)."""
    return {kind: hashlib.new(kind, data).digest() for kind in EXACT_KINDS}


def parse_hex(kind: str, value: str) -> bytes:
    """The raw digest of a hex string of ``kind``.

    Raises:
        ValueError: unknown kind, not hex, or the wrong length for the kind.
    """
    if kind not in DIGEST_BYTES:
        raise ValueError(f"unknown exact-hash kind {kind!r}; supported: {', '.join(EXACT_KINDS)}")
    size = DIGEST_BYTES[kind]
    if len(value) != 2 * size:
        raise ValueError(f"{kind} value must be {2 * size} hex characters, got {len(value)}")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise ValueError(f"{kind} value is not hexadecimal") from exc


def keyed(key: bytes, kind: str, digest: bytes) -> bytes:
    """The keyed form of one digest: HMAC-SHA256(key, kind || 0x00 || digest), 32 bytes.

    Raises:
        ValueError: unknown kind or a digest of the wrong size.
    """
    if DIGEST_BYTES.get(kind) != len(digest):
        raise ValueError(f"a {kind} digest has {DIGEST_BYTES.get(kind)} bytes, got {len(digest)}")
    return hmac.new(key, kind.encode() + b"\x00" + digest, hashlib.sha256).digest()


def keyed_digests(key: bytes, data: bytes) -> dict[str, bytes]:
    """The keyed form of every digest of ``data``: kind -> 32 bytes."""
    return {kind: keyed(key, kind, digest) for kind, digest in digests(data).items()}
