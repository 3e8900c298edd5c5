"""The payload codec inside index snapshots: named numpy arrays and JSON metadata in one
buffer, without pickle, decoded zero-copy. Also the canonical JSON encoding that both the
payload header and the snapshot file header (:mod:`moderation.banks.snapshot`) use.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

Buffer = bytes | bytearray | memoryview

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
        header = canonical_json(
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


def canonical_json(value: object) -> bytes:
    """``value`` as canonical JSON bytes: sorted keys, no spaces, ASCII only.

    Raises:
        TypeError: ``value`` holds something JSON cannot encode.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
