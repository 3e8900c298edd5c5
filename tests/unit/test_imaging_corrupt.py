"""Safe decoding, RELIABILITY.md I7: empty, garbage, truncated, corrupt and over-the-byte-limit
inputs are unscannable with their reason.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hostile import encode
from PIL import Image, ImageFile

from moderation.media.decode import (
    DecodeLimits,
    decode_file,
    decode_image,
)
from tests.unit.conftest import (
    animation,
    photo,
    reason_of,
)

# --- I7: empty, garbage, truncated, corrupt, over the byte limit -----------------------------


def test_empty_input_and_empty_file(tmp_path: Path) -> None:
    assert reason_of(lambda: decode_image(b"")) == "empty"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert reason_of(lambda: decode_file(empty)) == "empty"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(7).bytes(4096),
        b"<html><script>alert(1)</script></html>",
        b"\x00" * 1000,
        b"PK\x03\x04" + bytes(100),
    ],
    ids=["random", "html", "zeros", "zip"],
)
def test_garbage_is_an_unsupported_format(data: bytes) -> None:
    assert reason_of(lambda: decode_image(data)) == "unsupported_format"


_TRUNCATION_CASES = [
    ("JPEG", {}),
    ("JPEG", {"progressive": True}),
    ("PNG", {}),
    ("GIF", {}),
    ("WEBP", {}),
    ("BMP", {}),
    ("TIFF", {}),
    ("TIFF", {"compression": "tiff_deflate"}),
]


@pytest.mark.parametrize(("fmt", "params"), _TRUNCATION_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.7, 0.97])
def test_truncated_files_are_truncated(
    fmt: str, params: dict[str, object], fraction: float
) -> None:
    data = encode(photo(), fmt, **params)
    cut = data[: max(16, int(len(data) * fraction))]
    assert reason_of(lambda: decode_image(cut)) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_truncated_animations_are_truncated(fmt: str) -> None:
    frames = [photo(size=(64, 48)).rotate(10 * i) for i in range(4)]
    data = animation(frames, fmt)
    assert decode_image(data).n_frames == 4
    assert reason_of(lambda: decode_image(data[: len(data) * 2 // 3])) == "truncated"


def test_tiff_strips_past_the_end_are_truncated_not_a_libtiff_error() -> None:
    tifffile = pytest.importorskip(
        "tifffile", reason="tifffile (a scikit-image dependency) writes the IFD first"
    )
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.asarray(photo()), compression="zlib", rowsperstrip=16)
    data = buffer.getvalue()
    assert struct.unpack_from("<I", data, 4)[0] == 8, "needs the IFD before the strips"
    cut = data[: len(data) * 4 // 5]
    with Image.open(io.BytesIO(cut)) as image, pytest.raises(OSError, match="decoder error"):
        image.load()  # libtiff's own report names no cause
    assert reason_of(lambda: decode_image(cut)) == "truncated"


def test_corrupt_headers_of_allowed_formats_are_corrupt() -> None:
    png = encode(photo(size=(32, 32)), "PNG")
    bad_ihdr = png[:16] + struct.pack(">II", 0, 32) + png[24:]  # zero width
    assert reason_of(lambda: decode_image(bad_ihdr)) == "corrupt"
    jpeg_marker_garbage = b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9"
    assert reason_of(lambda: decode_image(jpeg_marker_garbage)) == "corrupt"


def test_over_the_byte_limit_in_memory_and_on_disk(tmp_path: Path) -> None:
    data = encode(photo(size=(64, 64)), "PNG")
    limits = DecodeLimits(max_bytes=len(data) - 1)
    assert reason_of(lambda: decode_image(data, limits)) == "too_large"
    assert decode_image(data, DecodeLimits(max_bytes=len(data))).n_frames == 1

    sparse = tmp_path / "huge.png"
    with sparse.open("wb") as file:
        file.write(data)
        file.truncate(1 << 30)  # 1 GiB, sparse: rejected by fstat before any read
    assert reason_of(lambda: decode_file(sparse)) == "too_large"


def test_decode_file_never_reads_past_the_limit() -> None:
    # /proc files report st_size 0 but have content: only the bounded read catches them.
    proc = Path("/proc/self/status")
    if not proc.exists():
        pytest.skip("needs Linux /proc (st_size 0 with content)")
    assert reason_of(lambda: decode_file(proc, DecodeLimits(max_bytes=64))) == "too_large"


def test_decode_file_unreadable_paths(tmp_path: Path) -> None:
    assert reason_of(lambda: decode_file(tmp_path / "missing.png")) == "unreadable"
    assert reason_of(lambda: decode_file(tmp_path)) == "unreadable"

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(reason_of(lambda: decode_file(fifo))))
    worker.daemon = True
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "decode_file blocked on a FIFO"
    assert outcome == ["unreadable"]


def test_decode_file_matches_decode_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(photo(), "JPEG"))
    from_file, from_bytes = decode_file(path), decode_image(path.read_bytes())
    assert from_file.frames[0].tobytes() == from_bytes.frames[0].tobytes()
    assert (from_file.format, from_file.size) == (from_bytes.format, from_bytes.size)
