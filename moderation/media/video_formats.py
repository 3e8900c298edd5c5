"""The allowed video containers: their magic bytes, and whether a file is cut short.

:func:`sniff_video` is the video half of the upload gate (the image half is
:func:`moderation.media.formats.sniff_format`): MP4 and MOV are ISO base media files (ISO/IEC
14496-12 section 4.3: a ``ftyp`` box first, its major brand telling QuickTime ``qt  `` from the
MP4 family); WebM is a Matroska/EBML file whose EBML header declares DocType ``webm``
(RFC 8794 and the WebM container guidelines). The sniffed container also names the one FFmpeg
demuxer :mod:`moderation.media.video` lets parse the file, so FFmpeg never probes its other
demuxers on untrusted bytes.

:func:`declared_past_end` tells truncation from corruption before decoding: a cut MP4 whose
``moov`` box comes first, or a WebM whose Segment has a known size, decodes without an error up
to the cut, so the container's own sizes are checked against the data length.
"""

from __future__ import annotations

import struct
from typing import Final

VIDEO_FORMATS: tuple[str, ...] = ("MP4", "MOV", "WEBM")
"""The video containers accepted for screening (:func:`sniff_video`'s answers)."""

DEMUXERS: Final[dict[str, str]] = {"MP4": "mp4", "MOV": "mov", "WEBM": "webm"}
"""FFmpeg demuxer forced for each container (``mp4``/``mov`` are one demuxer, ``webm`` is
``matroska``'s)."""

# ftyp major brands of QuickTime files (Apple QuickTime File Format, "File Type Compatibility
# Atom"); every other brand of an ISO base media file is taken as the MP4 family (isom, mp41,
# mp42, avc1, iso2-iso9, dash, M4V , 3gp4, ...).
_QUICKTIME_BRANDS: Final = (b"qt  ",)
_EBML_MAGIC: Final = b"\x1a\x45\xdf\xa3"
_EBML_DOCTYPE_ID: Final = b"\x42\x82"
_SEGMENT_ID: Final = b"\x18\x53\x80\x67"

SNIFF_BYTES: Final = 64
"""Bytes :func:`sniff_video` needs to see (the EBML header of every muxer we know is shorter)."""


def sniff_video(head: bytes) -> str | None:
    """The allowed video container whose signature starts ``head`` (pass the first
    :data:`SNIFF_BYTES` bytes), else None.

    Returns:
        "MP4", "MOV", "WEBM" or None (Matroska files other than WebM are None).
    """
    if len(head) >= 12 and head[4:8] == b"ftyp":
        size = struct.unpack_from(">I", head, 0)[0]
        if size < 16 and size != 1:  # a ftyp box holds at least its major and minor brand
            return None
        return "MOV" if head[8:12] in _QUICKTIME_BRANDS else "MP4"
    if head.startswith(_EBML_MAGIC):
        at = head.find(_EBML_DOCTYPE_ID)
        if at < 0:
            return None
        parsed = _vint(head, at + 2)
        if parsed is None:
            return None
        length, start = parsed
        return "WEBM" if head[start : start + length] == b"webm" else None
    return None


def _vint(data: bytes, pos: int) -> tuple[int, int] | None:
    """An EBML variable-size integer at ``pos`` (RFC 8794 section 4): (value, position after);
    the all-ones "unknown" value is returned as -1. None when cut short or invalid."""
    if pos >= len(data) or data[pos] == 0:
        return None
    first = data[pos]
    width = 8 - first.bit_length() + 1
    if pos + width > len(data):
        return None
    value = first & (0xFF >> width)
    for byte in data[pos + 1 : pos + width]:
        value = (value << 8) | byte
    if value == (1 << (7 * width)) - 1:
        return -1, pos + width
    return value, pos + width


def declared_past_end(data: bytes, fmt: str) -> str | None:
    """Why ``data`` is cut short, or None: a top-level ISO box (MP4, MOV) or the WebM Segment
    declares more bytes than the file has."""
    if fmt in ("MP4", "MOV"):
        return _iso_boxes_past_end(data)
    if fmt == "WEBM":
        return _segment_past_end(data)
    return None


def _iso_boxes_past_end(data: bytes) -> str | None:
    """Walk the top-level boxes (ISO/IEC 14496-12 section 4.2: 32-bit size, type; size 1: a
    64-bit size follows; size 0: to the end of the file)."""
    pos, total = 0, len(data)
    for _ in range(100_000):  # a 32 MiB file holds at most 4 M 8-byte boxes; stop early
        if pos == total:
            return None
        if pos + 8 > total:
            return f"box header at byte {pos} is cut short"
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > total:
                return f"box header at byte {pos} is cut short"
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            return None
        if size < header:
            return None  # malformed, not short: the demuxer reports it
        if pos + size > total:
            name = kind.decode("latin-1")
            return f"box {name!r} at byte {pos} declares {size} bytes, the file ends at {total}"
        pos += size
    return None


def _segment_past_end(data: bytes) -> str | None:
    """Skip the EBML header element, then compare the Segment's declared size (unless
    "unknown", as live muxers write it) with what remains."""
    parsed = _vint(data, len(_EBML_MAGIC))
    if parsed is None:
        return "EBML header is cut short"
    size, pos = parsed
    pos += max(size, 0)
    if not data.startswith(_SEGMENT_ID, pos):
        return None if pos < len(data) else "the file ends before its Segment"
    parsed = _vint(data, pos + len(_SEGMENT_ID))
    if parsed is None:
        return "Segment header is cut short"
    size, start = parsed
    if size >= 0 and start + size > len(data):
        return f"Segment declares {size} bytes, {len(data) - start} are present"
    return None
