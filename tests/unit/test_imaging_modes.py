"""Safe decoding, RELIABILITY.md I8: every mode to RGB by one rule (the embedding check is the
lead's; here the pixel rule is). The shared-mode originals come from ../shared, which skips
with its reason when absent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hostile import encode
from PIL import Image

from moderation.media.decode import (
    decode_file,
    decode_image,
)
from moderation.media.pixels import ALPHA_BACKGROUND, to_rgb
from tests.conftest import shared_path
from tests.unit.conftest import (
    mean_abs_diff,
    photo,
)

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
