"""Safe decoding (moderation.media.decode): RELIABILITY.md rows I1-I8.

Every input is built here (scikit-image photos, hand-made headers) or read from ../shared, which
skips with its reason when absent. I8's embedding check is the lead's; here the pixel rule is.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import subprocess
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hostile import encode, eps, fits, minimal_gif, pdf, png_chunk, png_from_header, psd
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, ExifTags, Image, ImageFile, ImageOps, PngImagePlugin

from moderation.config import Settings
from moderation.media import decode as imaging
from moderation.media.decode import (
    UNSCANNABLE_REASONS,
    DecodedImage,
    DecodeLimits,
    UnscannableImage,
    decode_file,
    decode_image,
)
from moderation.media.formats import ALLOWED_FORMATS, sniff_format
from moderation.media.pixels import ALPHA_BACKGROUND, to_rgb
from tests.conftest import shared_path, skimage_photo, skimage_photo_path

# --- helpers ---------------------------------------------------------------------------------


def small(image: Image.Image, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Box-filtered to a small size as float: removes dither and codec noise before comparing."""
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(small(a) - small(b)).mean())


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(UnscannableImage) as caught:
        call()
    assert caught.value.reason in UNSCANNABLE_REASONS
    return caught.value.reason


@contextmanager
def no_pixel_buffer_allocated() -> Iterator[None]:
    """Assert that Pillow creates no image memory inside the block (its allocator counters)."""
    core = Image.core  # type: ignore[attr-defined]
    core.reset_stats()
    yield
    assert core.get_stats()["new_count"] == 0, "a pixel buffer was allocated"


def with_chunks_after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    after_ihdr = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    return png[:after_ihdr] + b"".join(chunks) + png[after_ihdr:]


def solid_frames(n: int, size: tuple[int, int] = (32, 24)) -> list[Image.Image]:
    return [
        Image.new("RGB", size, (7 * i % 256, 255 - 11 * i % 256, 40 * i % 256)) for i in range(n)
    ]


def animation(frames: list[Image.Image], fmt: str) -> bytes:
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt in ("GIF", "PNG", "WEBP"):
        params["duration"] = 40
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params)


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    image: Image.Image = skimage_photo(name)
    return image.resize(size, Image.Resampling.LANCZOS) if size else image


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


# --- I1, I2: pixel limits and bombs ----------------------------------------------------------


def test_i1_huge_declared_png_is_too_large_before_any_pixel_buffer() -> None:
    # 30000 x 30000 RGB would be 2.5 GiB; the file is a header and a few bytes of IDAT.
    data = png_from_header(
        30000, 30000, bit_depth=8, colour_type=2, idat=zlib.compress(bytes(4096))
    )
    assert len(data) < 4096
    with no_pixel_buffer_allocated():
        assert reason_of(lambda: decode_image(data)) == "too_large"


def _png_between_one_and_two_times_pillows_limit() -> bytes:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = int((1.01 * limit) ** 0.5) + 1  # about 9510 px: 1.01x the limit, well under 2x
    assert limit < side * side < 2 * limit
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + one 1-bit row of zeros
    return png_from_header(
        side, side, bit_depth=1, colour_type=0, idat=zlib.compress(row * side, 9)
    )


def test_i2_image_between_one_and_two_times_the_limit_is_not_silently_decoded() -> None:
    data = _png_between_one_and_two_times_pillows_limit()
    filters_before, max_pixels_before = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    # Our own limit set higher than Pillow's: Pillow's warning, raised as an error, still wins.
    higher = DecodeLimits(max_pixels=10**9, max_total_pixels=10**9)
    with no_pixel_buffer_allocated():
        assert reason_of(lambda: decode_image(data)) == "too_large"
        assert reason_of(lambda: decode_image(data, higher)) == "too_large"
    assert warnings.filters == filters_before, "global warning filters changed"
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_own_pixel_limit_applies_to_the_declared_size() -> None:
    data = encode(photo(size=(120, 100)), "PNG")
    assert reason_of(lambda: decode_image(data, DecodeLimits(max_pixels=119 * 100))) == "too_large"
    assert decode_image(data, DecodeLimits(max_pixels=120 * 100)).size == (120, 100)


def _ztxt(inflated_size: int) -> bytes:
    return png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(inflated_size), 9))


def test_png_text_chunk_bomb_is_a_bomb() -> None:
    png = encode(photo(size=(16, 16)), "PNG")
    bomb = with_chunks_after_ihdr(png, _ztxt(PngImagePlugin.MAX_TEXT_CHUNK + 1))
    assert len(bomb) < 8192  # 1 MiB of text in a few KB
    assert reason_of(lambda: decode_image(bomb)) == "bomb"
    # Just under the per-chunk limit is fine.
    assert decode_image(with_chunks_after_ihdr(png, _ztxt(1000))).n_frames == 1


def test_png_icc_profile_bomb_is_a_bomb() -> None:
    png = encode(photo(size=(16, 16)), "PNG")
    payload = b"icc\x00\x00" + zlib.compress(bytes(PngImagePlugin.MAX_TEXT_CHUNK * 2), 9)
    assert (
        reason_of(lambda: decode_image(with_chunks_after_ihdr(png, png_chunk(b"iCCP", payload))))
        == "bomb"
    )


def test_png_many_text_chunks_over_the_total_is_a_bomb() -> None:
    png = encode(photo(size=(16, 16)), "PNG")
    count = PngImagePlugin.MAX_TEXT_MEMORY // PngImagePlugin.MAX_TEXT_CHUNK + 1
    chunks = [_ztxt(PngImagePlugin.MAX_TEXT_CHUNK)] * count
    assert reason_of(lambda: decode_image(with_chunks_after_ihdr(png, *chunks))) == "bomb"


# --- I4, I6: animations ----------------------------------------------------------------------


def test_i4_ten_thousand_frame_gif_is_too_many_frames_without_decoding_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[int] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        loads.append(1)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    data = minimal_gif(10_000)
    with pytest.raises(UnscannableImage) as caught:
        decode_image(data)
    assert caught.value.reason == "too_many_frames"
    assert loads == [], "frames were decoded to count them"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_frame_limit_boundary(fmt: str) -> None:
    limits = DecodeLimits(max_frames=5)
    at_limit = decode_image(animation(solid_frames(5), fmt), limits)
    assert at_limit.n_frames == 5
    assert at_limit.frame_indices == (0, 1, 2, 3, 4)
    assert (
        reason_of(lambda: decode_image(animation(solid_frames(6), fmt), limits))
        == "too_many_frames"
    )


def test_hand_built_gif_frames_are_counted_like_pillow() -> None:
    decoded = decode_image(minimal_gif(10), DecodeLimits(max_frames=10))
    with Image.open(io.BytesIO(minimal_gif(10))) as image:
        assert decoded.n_frames == getattr(image, "n_frames", 1) == 10
    assert {frame.getpixel((0, 0)) for frame in decoded.frames} == {(0, 0, 0), (255, 255, 255)}


def _benign_with_hidden(fmt: str, hidden_at: int = 23, n: int = 30) -> tuple[bytes, Image.Image]:
    """A 30-frame animation of one photo, slowly panning, with another photo at frame 23."""
    benign = photo("chelsea")
    hidden = photo("astronaut", size=(160, 120))
    frames = [benign.crop((4 * i, 0, 4 * i + 160, 120)) for i in range(n)]
    frames[hidden_at] = hidden
    return animation(frames, fmt), hidden


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
@pytest.mark.parametrize("retain", [True, False], ids=["one-pass", "two-pass"])
def test_i6_hidden_frame_in_a_benign_animation_is_returned(
    fmt: str, retain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not retain:
        monkeypatch.setattr(imaging, "_RETAIN_PIXELS", 0)
    data, hidden = _benign_with_hidden(fmt)
    evenly = set(np.linspace(0, 29, 8).round().astype(int).tolist())
    assert 23 not in evenly, "the test needs a frame that even sampling skips"

    decoded = decode_image(data)
    assert decoded.n_frames == 30
    assert len(decoded.frames) == len(decoded.frame_indices) == 8
    assert decoded.frame_indices[0] == 0
    assert list(decoded.frame_indices) == sorted(set(decoded.frame_indices))
    assert 23 in decoded.frame_indices
    returned = decoded.frames[decoded.frame_indices.index(23)]
    assert mean_abs_diff(returned, hidden) < 8
    assert all(frame.mode == "RGB" and frame.size == (160, 120) for frame in decoded.frames)


def test_one_and_two_pass_frame_selection_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = _benign_with_hidden("GIF")
    one_pass = decode_image(data)
    monkeypatch.setattr(imaging, "_RETAIN_PIXELS", 0)
    two_pass = decode_image(data)
    assert one_pass.frame_indices == two_pass.frame_indices
    for a, b in zip(one_pass.frames, two_pass.frames, strict=True):
        assert a.tobytes() == b.tobytes()


def test_frames_are_decoded_once_when_all_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import WebPImagePlugin

    monkeypatch.setattr(imaging, "_RETAIN_PIXELS", 0)  # would force a second pass otherwise
    seeks: list[int] = []
    real_seek = WebPImagePlugin.WebPImageFile.seek

    def recording_seek(self: WebPImagePlugin.WebPImageFile, frame: int) -> None:
        seeks.append(frame)
        real_seek(self, frame)

    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "seek", recording_seek)
    decoded = decode_image(animation(solid_frames(3), "WEBP"))
    assert decoded.frame_indices == (0, 1, 2)
    assert seeks == [1, 2]


def test_identical_pages_are_not_returned_twice() -> None:
    page = photo(size=(64, 48))
    decoded = decode_image(animation([page] * 20, "TIFF"))
    assert decoded.n_frames == 20
    assert decoded.frame_indices == (0,)


def test_total_pixel_budget_of_an_animation() -> None:
    data = animation(solid_frames(10, size=(100, 100)), "GIF")
    limits = DecodeLimits(max_total_pixels=10 * 100 * 100 - 1)
    assert reason_of(lambda: decode_image(data, limits)) == "too_large"
    assert decode_image(data, DecodeLimits(max_total_pixels=10 * 100 * 100)).n_frames == 10


def test_frame_pixel_limit_applies_to_every_page() -> None:
    pages = [Image.new("RGB", (20, 20), "red"), Image.new("RGB", (200, 200), "blue")]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert reason_of(lambda: decode_image(data, DecodeLimits(max_pixels=20 * 20))) == "too_large"


def test_skimage_animated_gif_decodes_like_pillow() -> None:
    path = skimage_photo_path("no_time_for_that_tiny")
    decoded = decode_file(path)
    with Image.open(path) as image:
        assert decoded.n_frames == getattr(image, "n_frames", 1) == 24
        assert decoded.size == image.size
        for index, frame in zip(decoded.frame_indices, decoded.frames, strict=True):
            image.seek(index)
            assert frame.mode == "RGB"
            assert frame.tobytes() == to_rgb(image).tobytes()
    assert len(decoded.frames) == min(decoded.n_frames, DecodeLimits().sampled_frames)


def test_skimage_multipage_tiff_returns_every_page() -> None:
    path = skimage_photo_path("multipage")
    decoded = decode_file(path)
    assert decoded.format == "TIFF"
    assert decoded.n_frames == 2
    assert decoded.frame_indices == (0, 1)
    with Image.open(path) as image:
        for index, frame in enumerate(decoded.frames):
            image.seek(index)
            assert frame.tobytes() == image.convert("RGB").tobytes()


# --- I5: EXIF orientation --------------------------------------------------------------------

# How a camera stores an upright picture for each EXIF orientation (EXIF 2.32, tag 0x0112):
# 3 = upside down; 6 = the 0th row is the visual right side (stored rotated 90° anticlockwise);
# 8 = the 0th row is the visual left side (stored rotated 90° clockwise).
_STORED_AS = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def _with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    if fmt == "TIFF":
        return encode(image, fmt, tiffinfo={ExifTags.Base.Orientation: orientation})
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(image, fmt, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_i5_exif_orientation_makes_the_image_upright(fmt: str, orientation: int) -> None:
    upright = photo("astronaut", size=(160, 100))
    stored = upright.transpose(_STORED_AS[orientation])
    decoded = decode_image(_with_orientation(stored, fmt, orientation))
    (frame,) = decoded.frames
    assert frame.size == upright.size
    assert mean_abs_diff(frame, upright) < 4
    # ...and not the stored pixels, which differ a lot from the upright ones.
    assert mean_abs_diff(stored.resize(upright.size), upright) > 20


def test_i5_real_camera_photos_with_orientation_come_out_upright() -> None:
    """ThreatExchange's exif-rotn photos: one scene shot with the phone held four ways.

    The shots differ, so no pixel equality: of the four rotations of each decoded photo, the
    upright one (no further rotation) must be the closest to the orientation-1 shot.
    """
    folder = shared_path("threatexchange-pdq", "reg-test-input", "exif-rotn")

    def grey(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=float)

    reference = grey(decode_file(folder / "exif-rotn-1.jpg", draft_size=(256, 256)).frames[0])
    for orientation in (3, 6, 8):
        frame = decode_file(folder / f"exif-rotn-{orientation}.jpg", draft_size=(256, 256)).frames[
            0
        ]
        assert frame.size[0] > frame.size[1] if orientation == 3 else frame.size[0] < frame.size[1]
        upright = np.abs(grey(frame) - reference).mean()
        for turn in (
            Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_180,
            Image.Transpose.ROTATE_270,
        ):
            assert upright < np.abs(grey(frame.transpose(turn)) - reference).mean(), (
                orientation,
                turn,
            )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_imageops_exif_transpose(orientation: int) -> None:
    data = _with_orientation(photo("astronaut", size=(48, 32)), "PNG", orientation)
    with Image.open(io.BytesIO(data)) as image:
        expected = ImageOps.exif_transpose(image).convert("RGB")
    assert decode_image(data).frames[0].tobytes() == expected.tobytes()


def _exif_with_ascii_orientation() -> bytes:
    # A big-endian TIFF header and one IFD entry: Orientation, type ASCII, "six".
    entry = struct.pack(">HHI", 0x0112, 2, 4) + b"six\x00"
    return b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + entry + bytes(4)


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + bytes(range(256)) * 2,
        b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x01" * 40,
        b"Exif\x00\x00hello",
        _exif_with_ascii_orientation(),
    ],
    ids=["garbage", "huge-ifd-count", "not-tiff", "ascii-orientation"],
)
def test_malformed_exif_means_no_rotation_not_unscannable(exif: bytes) -> None:
    source = photo(size=(40, 20))
    decoded = decode_image(encode(source, "JPEG", exif=exif))
    without_exif = decode_image(encode(source, "JPEG"))
    assert decoded.frames[0].tobytes() == without_exif.frames[0].tobytes()


def test_invalid_orientation_value_is_ignored() -> None:
    source = photo(size=(40, 20))
    decoded = decode_image(_with_orientation(source, "JPEG", 9))
    assert decoded.frames[0].tobytes() == decode_image(encode(source, "JPEG")).frames[0].tobytes()


def test_exif_that_raises_is_logged_and_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_getexif(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken_getexif)
    with caplog.at_level(logging.DEBUG, logger="moderation.media.decode"):
        decoded = decode_image(_with_orientation(photo(size=(40, 20)), "JPEG", 6))
    assert decoded.frames[0].size == (40, 20)
    assert "EXIF" in caplog.text


# --- I8: every mode to RGB by one rule -------------------------------------------------------

_SHARED_GREY = {"1", "L", "LA", "F", "I"}  # saved from a grey conversion of original.jpg


def test_i8_shared_modes_match_the_original() -> None:
    folder = shared_path("threatexchange-pdq", "misc-images", "modes")
    original = decode_file(folder / "original.jpg").frames[0]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    assert len(files) >= 14, "the README lists 13 modes and the original"
    for path in files:
        frame = decode_file(path).frames[0]
        assert frame.mode == "RGB"
        assert frame.size == original.size
        if path.stem in _SHARED_GREY:
            distance = mean_abs_diff(frame.convert("L"), original.convert("L"))
            assert distance < 3, (path.name, distance)
        else:
            distance = mean_abs_diff(frame, original)
            assert distance < 3, (path.name, distance)


def _grey_array() -> np.ndarray:
    return np.asarray(photo().convert("L"))


# mode id -> (image builder, is grey, format that stores the mode or None for in-memory only)
_MODE_CASES: dict[str, tuple[Callable[[], Image.Image], bool, str | None]] = {
    "1": (lambda: photo().convert("1"), True, "PNG"),
    "L": (lambda: photo().convert("L"), True, "PNG"),
    "LA": (lambda: photo().convert("LA"), True, "PNG"),
    "La": (lambda: photo().convert("LA").convert("La"), True, None),
    "P": (lambda: photo().convert("P"), False, "PNG"),
    "P-adaptive": (lambda: photo().quantize(64), False, "GIF"),
    "PA": (lambda: photo().convert("PA"), False, "TIFF"),
    "RGB": (lambda: photo(), False, "PNG"),
    "RGBA": (lambda: photo().convert("RGBA"), False, "PNG"),
    "RGBa": (lambda: photo().convert("RGBa"), False, None),
    "RGBX": (lambda: photo().convert("RGBX"), False, None),
    "CMYK": (lambda: photo().convert("CMYK"), False, "TIFF"),
    "CMYK-jpeg": (lambda: photo().convert("CMYK"), False, "JPEG"),
    "YCbCr": (lambda: photo().convert("YCbCr"), False, "TIFF"),
    "LAB": (lambda: photo().convert("LAB"), False, "TIFF"),
    "HSV": (lambda: photo().convert("HSV"), False, None),
    "I-8bit": (lambda: photo().convert("L").convert("I"), True, "TIFF"),
    "I-16bit": (lambda: Image.fromarray(_grey_array().astype(np.int32) * 257), True, "TIFF"),
    "I;16": (lambda: Image.fromarray(_grey_array().astype(np.uint16) * 257), True, "PNG"),
    "I;16-tiff": (lambda: Image.fromarray(_grey_array().astype(np.uint16) * 257), True, "TIFF"),
    "F-0..1": (lambda: Image.fromarray(_grey_array().astype(np.float32) / 255), True, "TIFF"),
    "F-0..255": (lambda: photo().convert("L").convert("F"), True, "TIFF"),
}


@pytest.mark.parametrize("case", list(_MODE_CASES))
def test_i8_generated_modes_match_the_photo(case: str, tmp_path: Path) -> None:
    build, grey, fmt = _MODE_CASES[case]
    image = build()
    reference = photo().convert("L") if grey else photo()
    if fmt is None:
        first, second = to_rgb(image), to_rgb(image)
    else:
        path = tmp_path / f"photo.{fmt.lower()}"
        image.save(path, fmt)
        with Image.open(path) as reopened:
            assert reopened.mode == image.mode, "the file does not hold the mode under test"
        first = decode_file(path).frames[0]
        with Image.open(path) as reopened:
            second = to_rgb(reopened).copy()
    assert first.mode == "RGB"
    assert first.tobytes() == second.tobytes(), "decode and to_rgb disagree"
    compared = first.convert("L") if grey else first
    limit = 8 if case == "1" else 3  # 1-bit is dithered: noise survives the box filter
    assert mean_abs_diff(compared, reference) < limit


def test_to_rgb_returns_an_rgb_image_itself() -> None:
    image = photo()
    assert to_rgb(image) is image


def test_sixteen_bit_data_does_not_clip_to_white() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    for image in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):
        grey = np.asarray(to_rgb(image).convert("L"), dtype=np.int64)
        assert grey.min() == 0
        assert grey.max() == 255
        assert np.abs(grey[0] - np.linspace(0, 255, 256)).max() <= 1


def test_float_and_int_extremes() -> None:
    weird = np.array([[np.nan, -np.inf, np.inf, -5.0, 2e9]], dtype=np.float32)
    assert to_rgb(Image.fromarray(weird)).mode == "RGB"
    constant = to_rgb(Image.fromarray(np.full((4, 4), -7, dtype=np.int32)))
    assert constant.getextrema() == ((0, 0), (0, 0), (0, 0))
    wide = np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32)
    stretched = to_rgb(Image.fromarray(wide))
    assert [stretched.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_alpha_is_composited_onto_the_background() -> None:
    assert ALPHA_BACKGROUND == (255, 255, 255)
    clear = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert clear.getpixel((0, 0)) == ALPHA_BACKGROUND
    half = to_rgb(Image.new("RGBA", (4, 4), (200, 0, 0, 128))).getpixel((0, 0))
    assert isinstance(half, tuple)
    expected = [
        round((c * 128 + b * 127) / 255) for c, b in zip((200, 0, 0), ALPHA_BACKGROUND, strict=True)
    ]
    assert all(abs(a - b) <= 1 for a, b in zip(half, expected, strict=True))
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert to_rgb(opaque).tobytes() == opaque.convert("RGB").tobytes()
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == ALPHA_BACKGROUND
    assert to_rgb(Image.new("PA", (4, 4), (0, 0))).getpixel((0, 0)) == ALPHA_BACKGROUND


def test_palette_and_colour_key_transparency_in_files() -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    for fmt in ("PNG", "GIF"):
        frame = decode_image(encode(palette, fmt, transparency=1)).frames[0]
        assert frame.getpixel((0, 0)) == (255, 0, 0)
        assert frame.getpixel((5, 5)) == ALPHA_BACKGROUND
    rgb = Image.new("RGB", (8, 8), (0, 0, 0))
    rgb.putpixel((0, 0), (9, 9, 9))
    frame = decode_image(encode(rgb, "PNG", transparency=(0, 0, 0))).frames[0]
    assert frame.getpixel((0, 0)) == (9, 9, 9)
    assert frame.getpixel((5, 5)) == ALPHA_BACKGROUND
    deep = Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16))
    deep.putpixel((0, 0), 65535)
    frame = decode_image(encode(deep, "PNG", transparency=1000)).frames[0]
    assert frame.getpixel((0, 0)) == (255, 255, 255)
    assert frame.getpixel((5, 5)) == ALPHA_BACKGROUND


# --- JPEG draft ------------------------------------------------------------------------------


def test_jpeg_draft_reduces_by_a_power_of_two_but_not_below_the_request() -> None:
    data = encode(photo("astronaut", size=(2000, 1500)), "JPEG", quality=90)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=(224, 224))
    assert full.frames[0].size == drafted.size == full.size == (2000, 1500)
    width, height = drafted.frames[0].size
    assert width >= 224 and height >= 224
    assert width < 2000 and height < 1500
    assert 2000 // width in (2, 4, 8)
    assert mean_abs_diff(drafted.frames[0], full.frames[0]) < 4


def test_jpeg_draft_respects_exif_rotation() -> None:
    upright = photo("astronaut", size=(1000, 2000))
    data = _with_orientation(upright.transpose(_STORED_AS[6]), "JPEG", 6)
    decoded = decode_image(data, draft_size=(300, 600))
    width, height = decoded.frames[0].size
    assert decoded.size == (2000, 1000)  # as stored
    assert width >= 300 and height >= 600
    assert width < 1000 and height < 2000
    assert mean_abs_diff(decoded.frames[0], upright) < 4


def test_draft_is_ignored_for_other_formats() -> None:
    data = encode(photo(size=(800, 600)), "PNG")
    assert decode_image(data, draft_size=(100, 100)).frames[0].size == (800, 600)


@pytest.mark.parametrize("draft_size", [(0, 10), (10, -1), (10,), (1.5, 2)])
def test_invalid_draft_size_is_a_value_error(draft_size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="draft_size"):
        decode_image(encode(photo(size=(8, 8)), "JPEG"), draft_size=draft_size)


# --- value types ---------------------------------------------------------------------------


def test_limits_from_settings(settings: Settings) -> None:
    limits = DecodeLimits.from_settings(settings)
    assert limits.max_bytes == settings.max_image_bytes
    assert limits.max_pixels == settings.max_image_pixels
    assert limits.max_frames == settings.max_frames
    assert limits.sampled_frames == settings.sampled_frames
    assert limits.max_total_pixels == 2 * settings.max_image_pixels
    assert DecodeLimits().max_pixels == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(
    "field", ["max_bytes", "max_pixels", "max_frames", "sampled_frames", "max_total_pixels"]
)
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecodeLimits(**{field: 0})


def test_unscannable_image_carries_reason_and_detail_through_pickle() -> None:
    error = UnscannableImage("truncated", "image file is truncated")
    assert str(error) == "truncated: image file is truncated"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail) == ("truncated", "image file is truncated")
    assert str(UnscannableImage("empty")) == "empty"


def test_decoded_frames_outlive_the_input_buffer() -> None:
    data = bytearray(encode(photo(size=(64, 48)), "PNG"))
    decoded = decode_image(bytes(data))
    assert isinstance(decoded, DecodedImage)
    before = decoded.frames[0].tobytes()
    data[:] = bytes(len(data))
    assert decoded.frames[0].tobytes() == before
