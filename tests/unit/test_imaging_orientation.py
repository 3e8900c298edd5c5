"""Safe decoding, RELIABILITY.md I5: EXIF orientation makes the image upright; the JPEG draft
reduces the decoded size and respects that rotation.

The real camera photos come from ../shared, which skips with its reason when absent.
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pytest
from hostile import encode
from PIL import ExifTags, Image, ImageOps

from moderation.media.decode import (
    decode_file,
    decode_image,
)
from tests.conftest import shared_path
from tests.unit.conftest import (
    mean_abs_diff,
    photo,
)

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
