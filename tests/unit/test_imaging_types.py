"""Safe decoding: the value types (limits from settings, unscannable-image reasons, decoded
frames).
"""

from __future__ import annotations

import pickle

import pytest
from hostile import encode
from PIL import Image

from moderation.config import Settings
from moderation.media.decode import (
    DecodedImage,
    DecodeLimits,
    UnscannableImage,
    decode_image,
)
from tests.unit.conftest import (
    photo,
)

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
