"""Safe decoding (moderation.media.decode): the allowed formats, sniffing, and I3 (other
formats, even named as allowed ones, are rejected without a subprocess).
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile import encode, eps, fits, pdf, psd
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image

from moderation.media.decode import (
    decode_file,
    decode_image,
)
from moderation.media.formats import ALLOWED_FORMATS, sniff_format
from tests.conftest import skimage_photo_path
from tests.unit.conftest import (
    mean_abs_diff,
    photo,
    reason_of,
)

# --- formats, sniffing, I3 -------------------------------------------------------------------


def test_allowed_formats_are_the_six_raster_formats() -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_each_allowed_format_is_sniffed_and_decoded(fmt: str) -> None:
    source = photo(size=(120, 80))
    data = encode(source, fmt)
    assert sniff_format(data[:16]) == fmt
    decoded = decode_image(data)
    assert decoded.format == fmt
    assert decoded.size == (120, 80)
    assert decoded.n_frames == 1
    assert decoded.frame_indices == (0,)
    (frame,) = decoded.frames
    assert frame.mode == "RGB"
    assert frame.size == (120, 80)
    # GIF is palette-quantised, JPEG and WebP are lossy: close, not equal.
    assert mean_abs_diff(frame, source) < 6


_MAGIC_PREFIXES = (
    b"\xff\xd8\xff",
    b"\xff\xd8",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n",
    b"GIF87a",
    b"GIF89a",
    b"GIF88a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"RIFF\x00\x00\x00\x00WEBPVP9 ",
    b"RIFF\x00\x00\x00\x00WAVEfmt ",
    b"II*\x00",
    b"MM\x00*",
    b"II\x00*",
    b"MM*\x00",
    b"II+\x00",
    b"MM\x00+",
    b"%!PS-Adobe-3.0 EPSF-3.0",
    b"8BPS",
    b"%PDF-1.4",
    b"SIMPLE  =",
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    prefix=st.sampled_from((b"", *_MAGIC_PREFIXES)),
    tail=st.binary(max_size=16),
)
def test_sniff_format_agrees_with_pillows_own_accept_functions(prefix: bytes, tail: bytes) -> None:
    head = (prefix + tail)[:16]
    Image.init()
    accepts = [(fmt, Image.OPEN[fmt][1]) for fmt in ALLOWED_FORMATS]
    pillow = [fmt for fmt, accept in accepts if accept is not None and accept(head) is True]
    assert sniff_format(head) == (pillow[0] if pillow else None)


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every way of starting a process record the attempt and fail."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> object:
        attempts.append(args)
        raise AssertionError(f"a process was started: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)
    monkeypatch.setattr(os, "posix_spawnp", refuse)
    return attempts


def test_the_subprocess_trap_catches_pillows_ghostscript_call(
    no_subprocess: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: without the allowlist, Pillow's EPS plugin starts Ghostscript when loading."""
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget any earlier probe
    with Image.open(io.BytesIO(eps())) as image, pytest.raises(AssertionError):
        image.load()
    assert no_subprocess, "Pillow did not try to start a process: the trap proves nothing"


@pytest.mark.parametrize("make", [eps, psd, fits, pdf], ids=["EPS", "PSD", "FITS", "PDF"])
def test_other_formats_named_png_are_rejected_without_a_subprocess(
    make: Callable[[], bytes],
    tmp_path: Path,
    no_subprocess: list[object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    path = tmp_path / "upload.png"
    path.write_bytes(make())
    assert sniff_format(path.read_bytes()[:16]) is None
    assert reason_of(lambda: decode_file(path)) == "unsupported_format"
    assert reason_of(lambda: decode_image(path.read_bytes())) == "unsupported_format"
    assert no_subprocess == []


def test_allowed_container_with_a_pixel_layout_pillow_cannot_decode() -> None:
    # scikit-image's planar float64 RGB TIFF: a valid TIFF that Pillow has no mode for.
    data = skimage_photo_path("multipage_rgb").read_bytes()
    assert sniff_format(data[:16]) == "TIFF"
    assert reason_of(lambda: decode_image(data)) == "unsupported_format"
