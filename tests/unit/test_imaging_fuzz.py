"""Fuzzing the decode wrapper with hypothesis (RELIABILITY.md I10, bounded to a few seconds).

Valid small images of every allowed format (stills, animations, deep and alpha modes) are
mutated: bit flips anywhere or in the header, truncation, overwritten, inserted and deleted
runs, and random bytes behind a valid magic number. Whatever comes out, ``decode_image`` either
returns well-formed RGB frames or raises ``UnscannableImage`` with a documented reason: any
other exception (the decoder errors Pillow's OSS-Fuzz harness tolerates are supposed to be
classified, not leaked) fails the test. Atheris coverage-guided fuzzing of the same property is
the longer-running complement.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from moderation.media.decode import (
    UNSCANNABLE_REASONS,
    DecodedImage,
    DecodeLimits,
    UnscannableImage,
    decode_image,
)
from tests.conftest import skimage_photo

# Small limits keep a mutated header that declares a large image cheap to reject or decode.
LIMITS = DecodeLimits(
    max_bytes=1 << 20,
    max_pixels=1 << 18,
    max_frames=16,
    sampled_frames=3,
    max_total_pixels=1 << 20,
)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@cache
def seeds() -> dict[str, bytes]:
    """Valid inputs to mutate: about 1-20 KB each."""
    photo = skimage_photo("coffee").resize((40, 28))
    frames = [photo.rotate(30 * i) for i in range(4)]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    deep = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    out = {
        "jpeg": _encode(photo, "JPEG", quality=80),
        "jpeg-progressive-exif": _encode(photo, "JPEG", progressive=True, exif=exif),
        "jpeg-cmyk": _encode(photo.convert("CMYK"), "JPEG"),
        "png": _encode(photo, "PNG"),
        "png-rgba": _encode(photo.convert("RGBA"), "PNG"),
        "png-p-transparency": _encode(photo.convert("P"), "PNG", transparency=0),
        "png-16bit": _encode(deep, "PNG"),
        "png-interlaced": _encode(photo, "PNG", interlace=1),
        "gif": _encode(photo, "GIF"),
        "webp": _encode(photo, "WEBP"),
        "webp-lossless": _encode(photo.convert("RGBA"), "WEBP", lossless=True),
        "bmp": _encode(photo, "BMP"),
        "bmp-rle": _encode(photo.convert("P"), "BMP"),
        "tiff": _encode(photo, "TIFF"),
        "tiff-deflate": _encode(photo, "TIFF", compression="tiff_deflate"),
        "tiff-float": _encode(photo.convert("F"), "TIFF"),
        "tiff-lab": _encode(photo.convert("LAB"), "TIFF"),
    }
    for fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        params: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
        if fmt != "TIFF":
            params["duration"] = 50
        out[f"{fmt.lower()}-animated"] = _encode(frames[0], fmt, **params)
    return out


@st.composite
def mutated_inputs(draw: st.DrawFn) -> tuple[str, str, bytes]:
    name = draw(st.sampled_from(sorted(seeds())))
    data = bytearray(seeds()[name])
    kind = draw(
        st.sampled_from(
            ["flip", "flip-header", "truncate", "overwrite", "insert", "delete", "random-body"]
        )
    )
    if kind in ("flip", "flip-header"):
        end = min(len(data), 96) if kind == "flip-header" else len(data)
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, end - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind in ("overwrite", "insert"):
        position = draw(st.integers(0, len(data)))
        run = draw(st.binary(min_size=1, max_size=32))
        if kind == "insert":
            data[position:position] = run
        else:
            data[position : position + len(run)] = run
    elif kind == "delete":
        position = draw(st.integers(0, len(data) - 1))
        del data[position : position + draw(st.integers(1, 64))]
    else:
        keep = draw(st.integers(4, 64))
        data = data[:keep] + bytearray(draw(st.binary(min_size=0, max_size=2048)))
    return name, kind, bytes(data)


def check_outcome(data: bytes) -> DecodedImage | None:
    """Decode and assert the contract; return the result or None when unscannable."""
    try:
        decoded = decode_image(data, LIMITS)
    except UnscannableImage as exc:
        assert exc.reason in UNSCANNABLE_REASONS, exc.reason
        return None
    assert 1 <= len(decoded.frames) <= LIMITS.sampled_frames
    assert len(decoded.frame_indices) == len(decoded.frames)
    assert decoded.frame_indices[0] == 0
    assert list(decoded.frame_indices) == sorted(set(decoded.frame_indices))
    assert decoded.frame_indices[-1] < decoded.n_frames <= LIMITS.max_frames
    for frame in decoded.frames:
        assert frame.mode == "RGB"
        assert 0 < frame.width * frame.height <= LIMITS.max_pixels
    return decoded


@pytest.mark.parametrize("name", sorted(seeds()))
def test_every_seed_decodes(name: str) -> None:
    assert check_outcome(seeds()[name]) is not None, name


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=mutated_inputs())
def test_mutated_images_decode_or_are_unscannable(case: tuple[str, str, bytes]) -> None:
    _, _, data = case
    check_outcome(data)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_are_unscannable(data: bytes) -> None:
    assert check_outcome(data) is None
