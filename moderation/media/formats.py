"""The allowed image formats: their magic bytes, and why a parse of one of them failed.

:func:`sniff_format` is the first gate of :func:`moderation.media.decode.decode_image` (and the
HTTP hook's 415 check). When Pillow then fails on an allowed format, :func:`classify_failure`
names the reason from the exception and, where Pillow's message is vague, from the format's own
header (a WebP, BMP, GIF or TIFF whose header points past the end of the data is truncated, not
corrupt). The reasons are the ones documented in :mod:`moderation.media.decode`.
"""

from __future__ import annotations

import io
import struct
from typing import Final

from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format names that may be parsed; passed to ``Image.open(formats=...)``."""


# Plugin classes, to re-run a failed header parse and learn why (Image.open only says "cannot
# identify"). JPEG also covers MPO, whose factory starts from the JPEG parser.
_PLUGINS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}


def sniff_format(head: bytes) -> str | None:
    """The allowed format whose magic bytes start ``head``, else None.

    For the HTTP hook's 415 check, and the first gate of
    :func:`moderation.media.decode.decode_image`. Pass at least the
    first 16 bytes (WebP needs 16). The signatures mirror the ``_accept`` functions of Pillow's
    plugins (PIL/JpegImagePlugin.py, PngImagePlugin.py, WebPImagePlugin.py, GifImagePlugin.py,
    BmpImagePlugin.py, TiffImagePlugin.py ``PREFIXES``), so anything this accepts Pillow will try
    and anything it rejects Pillow would not parse as an allowed format.

    Returns:
        "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF" or None.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP" and head[12:16] in _WEBP_CHUNKS:
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith(_TIFF_PREFIXES):
        return "TIFF"
    return None


_WEBP_CHUNKS: Final = (b"VP8 ", b"VP8X", b"VP8L")
_TIFF_PREFIXES: Final = tuple(TiffImagePlugin.PREFIXES)


def _diagnose(data: bytes, fmt: str) -> BaseException | None:
    """The exception ``fmt``'s plugin raises on ``data``'s header, or None if it opens."""
    plugin = _PLUGINS.get(fmt)
    if plugin is None:
        return None
    try:
        plugin(io.BytesIO(data)).close()
    except DECODER_ERRORS as exc:
        # ImageFile wraps IndexError, KeyError, EOFError, struct.error as SyntaxError(original).
        return exc.__cause__ if isinstance(exc.__cause__, EOFError) else exc
    return None


def _declares_more_data(data: bytes, fmt: str) -> bool:
    """Whether the header points past the end of ``data`` (so a failure means truncation)."""
    try:
        if fmt == "WEBP":  # RIFF chunk size excludes the 8-byte RIFF header
            return bool(struct.unpack_from("<I", data, 4)[0] + 8 > len(data))
        if fmt == "BMP":  # BITMAPFILEHEADER bfSize
            return bool(struct.unpack_from("<I", data, 2)[0] > len(data))
        if fmt == "GIF":  # every GIF ends with the trailer 0x3B (GIF89a section 27)
            return not data.endswith(b";")
        if fmt == "TIFF":
            return _tiff_ifds_end_past(data)
    except struct.error:
        return True
    return False


def _tiff_ifds_end_past(data: bytes) -> bool:
    """Whether an IFD in the chain (TIFF 6.0 section 2; BigTIFF) lies past the end of ``data``.

    Raises:
        struct.error: the header itself is cut short.
    """
    order = "<" if data.startswith(b"II") else ">"
    big = data[2:4] in (b"\x2b\x00", b"\x00\x2b")
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    offset_size = struct.calcsize(offset_format)
    offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < 4096:
        seen.add(offset)
        if offset + struct.calcsize(count_format) > len(data):
            return True
        count = struct.unpack_from(order + count_format, data, offset)[0]
        next_at = offset + struct.calcsize(count_format) + count * entry_size
        if next_at + offset_size > len(data):
            return True
        offset = struct.unpack_from(order + offset_format, data, next_at)[0]
    return False


# What a broken file can make Pillow raise: the OSS-Fuzz harness list (see the module docstring of
# :mod:`moderation.media.decode`;
# OverflowError is an ArithmeticError, UnidentifiedImageError an OSError) plus what broken plugins
# raise (struct.error, IndexError and KeyError as LookupError, EOFError, TypeError).
# RecursionError: deeply nested TIFF IFDs or EXIF sub-IFDs.
DECODER_ERRORS: Final = (
    OSError,
    SyntaxError,
    MemoryError,
    ValueError,
    NotImplementedError,
    ArithmeticError,
    LookupError,
    EOFError,
    TypeError,
    struct.error,
    RecursionError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

# Substrings of Pillow's messages (lower-cased) used to classify a failure.
_BOMB_MARKERS: Final = ("decompressed data too large", "too much memory used in text chunks")
_UNSUPPORTED_MARKERS: Final = ("unknown pixel mode", "not supported", "unsupported")


def classify_failure(exc: BaseException, data: bytes, fmt: str) -> tuple[str, str]:
    """Map a Pillow failure on an allowed format to a reason.

    Args:
        exc: what Pillow raised, one of :data:`DECODER_ERRORS`.
        data: the whole file.
        fmt: the format :func:`sniff_format` found.

    Returns:
        (reason, detail) for :class:`moderation.media.decode.UnscannableImage`; the reasons are
        documented in :mod:`moderation.media.decode`.
    """
    if isinstance(exc, UnidentifiedImageError):
        # Image.open hides why the plugin refused the header: ask the plugin itself.
        exc = _diagnose(data, fmt) or exc
    message = str(exc) or type(exc).__name__
    lowered = message.lower()
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too_large", message
    if isinstance(exc, MemoryError):
        return "too_large", f"out of memory while decoding: {message}"
    if any(marker in lowered for marker in _BOMB_MARKERS):
        return "bomb", message
    if isinstance(exc, EOFError) or "truncated" in lowered or _declares_more_data(data, fmt):
        return "truncated", message
    if isinstance(exc, NotImplementedError) or any(m in lowered for m in _UNSUPPORTED_MARKERS):
        return "unsupported_format", f"{fmt}: {message}"
    return "corrupt", f"{fmt}: {message}"


def tiff_data_ends(image: ImageFile.ImageFile) -> list[int]:
    """Byte offsets where a TIFF frame's strips end, then where its tiles end.

    From the StripOffsets/StripByteCounts (273/279) and TileOffsets/TileByteCounts (324/325)
    tags of TIFF 6.0, one value for each pair the frame has; empty for an image without TIFF
    tags.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return []
    found = []
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles (TIFF 6.0)
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if not isinstance(offsets, tuple) or not isinstance(counts, tuple):
            continue
        ends = [
            o + c
            for o, c in zip(offsets, counts, strict=False)
            if isinstance(o, int) and isinstance(c, int)
        ]
        if ends:
            found.append(max(ends))
    return found
