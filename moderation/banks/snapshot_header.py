"""The header of a snapshot file (:mod:`moderation.banks.snapshot`): its canonical encoding,
parsing and validation, the wrapped data key it carries and the associated data it binds.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable, Iterator, Mapping
from io import BufferedReader
from typing import Any

from moderation.banks.payload import Buffer, canonical_json
from moderation.banks.snapshot_stream import read_exact
from moderation.crypto.envelope import WRAPPED_BLOB_BYTES, WrappedKey

MAGIC = b"MODSNAP\x00"
FORMAT = 1
MAX_HEADER_BYTES = 64 * 1024

_AAD_PREFIX = b"moderation/snapshot/v1\x00"
_HEADER_KEYS = frozenset(
    {"format", "snapshot_id", "version", "encoder_id", "created_at", "key_id", "wrapped_key"}
)


def payload_aad(header: Mapping[str, Any]) -> bytes:
    """The payload's AES-GCM associated data: the bound header fields, canonical."""
    bound = {k: header[k] for k in ("format", "snapshot_id", "version", "encoder_id", "created_at")}
    return _AAD_PREFIX + canonical_json(bound)


def file_parts(
    header: Mapping[str, Any], body: Iterator[Buffer], update: Callable[[Buffer], object]
) -> Iterator[Buffer]:
    """Yield the file's bytes: magic, header length, ``header`` (canonical), then ``body``;
    each part is passed to ``update`` (e.g. a hasher's) first."""
    header_bytes = canonical_json(header)
    for part in (MAGIC, struct.pack(">I", len(header_bytes)), header_bytes):
        update(part)
        yield part
    for chunk in body:
        update(chunk)
        yield chunk


def with_wrapped_key(header: Mapping[str, Any], wrapped: WrappedKey) -> dict[str, Any]:
    """``header`` with ``key_id`` and ``wrapped_key`` (base64) set from ``wrapped``."""
    return {
        **header,
        "key_id": wrapped.key_id,
        "wrapped_key": base64.b64encode(wrapped.blob).decode("ascii"),
    }


def header_bytes(header: Mapping[str, Any]) -> int:
    """Bytes before the nonce: magic, header length and the canonical header."""
    return len(MAGIC) + 4 + len(canonical_json(header))


def parse_header(handle: BufferedReader, size: int) -> tuple[dict[str, Any], int]:
    """Validated header and the offset of the body. Raises ValueError with the cause."""
    if size < len(MAGIC) + 4:
        raise ValueError(f"file is {size} bytes, too short for a snapshot")
    if read_exact(handle, len(MAGIC)) != MAGIC:
        raise ValueError("bad magic: not a snapshot file, or corrupted")
    (header_len,) = struct.unpack(">I", read_exact(handle, 4))
    if header_len > MAX_HEADER_BYTES or len(MAGIC) + 4 + header_len > size:
        raise ValueError(f"header length {header_len} is implausible for a {size}-byte file")
    raw = read_exact(handle, header_len)
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
    if canonical_json(header) != raw:
        raise ValueError("header is not in canonical form (altered bytes)")
    return header, len(MAGIC) + 4 + header_len


def wrapped_key_of(header: Mapping[str, Any]) -> WrappedKey:
    """The wrapped data key a parsed header carries. Raises ValueError when malformed."""
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
