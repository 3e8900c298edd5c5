"""Builders of hostile and unusual image files, shared by the decode and CLI tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved in ``fmt`` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 (PNG specification, section 5.3)."""
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_from_header(
    width: int, height: int, *, bit_depth: int, colour_type: int, idat: bytes
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def minimal_gif(n_frames: int) -> bytes:
    """A 1 x 1 GIF89a with n_frames frames of alternating black and white, built by hand."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b"!\xf9\x04\x00\x01\x00\x00\x00"  # graphic control extension, 10 ms
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
    black = control + descriptor + b"\x02\x02\x44\x01\x00"  # LZW: clear, 0, end
    white = control + descriptor + b"\x02\x02\x4c\x01\x00"  # LZW: clear, 1, end
    return header + (black + white) * (n_frames // 2) + black * (n_frames % 2) + b";"


def eps() -> bytes:
    return encode(Image.new("RGB", (8, 8), (10, 20, 30)), "EPS")


def psd() -> bytes:
    # Adobe Photoshop file format: signature, version 1, 6 reserved, channels, h, w, depth, mode.
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3)
    return header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + bytes(8 * 8 * 3)


def fits() -> bytes:
    cards = (
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    8",
        "NAXIS2  =                    8",
        "END",
    )
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode("ascii")
    return header + bytes(2880)


def pdf() -> bytes:
    return encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PDF")
