"""The decode fast path: JPEG draft to (long 512, short 224) by orientation, one decode shared
by PDQ and the encoder, equivalent to a full decode for both signals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from moderation.matching.screening import Screener
from moderation.media.decode import decode_image
from moderation.signals.encoders import create_encoder
from moderation.signals.pdq import pdq_hash
from tests.conftest import skimage_photo


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def _large(name: str, size: tuple[int, int]) -> Image.Image:
    return skimage_photo(name).resize(size, Image.Resampling.BICUBIC)


def test_screener_drafts_to_long_512_short_224() -> None:
    import inspect

    assert inspect.signature(Screener).parameters["draft_size"].default == (512, 224)


@pytest.mark.parametrize("size", [(2000, 1500), (1500, 2000), (4000, 900)])
def test_draft_by_orientation_keeps_each_side_above_its_minimum(size: tuple[int, int]) -> None:
    data = _jpeg(_large("astronaut", size))
    frame = decode_image(data, draft_size=(512, 224), draft_by_orientation=True).frames[0]
    long_side, short_side = max(frame.size), min(frame.size)
    assert long_side >= 512 and short_side >= 224
    assert (frame.width > frame.height) == (size[0] > size[1])  # orientation kept
    assert max(size) // long_side >= 2  # really reduced (power-of-two DCT scaling)
    # Never more pixels than the old square request, and fewer for wide or tall photos.
    square = decode_image(data, draft_size=(512, 512)).frames[0]
    assert frame.width * frame.height <= square.width * square.height
    if size == (4000, 900):
        assert frame.width * frame.height < square.width * square.height


def test_draft_by_orientation_follows_exif_rotation() -> None:
    upright = _large("coffee", (1200, 2400))  # portrait as displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored landscape, orientation 6
    data = _jpeg(stored, orientation=6)
    frame = decode_image(data, draft_size=(512, 224), draft_by_orientation=True).frames[0]
    assert frame.height > frame.width
    assert frame.height >= 512 and frame.width >= 224 and frame.height < 2400


def test_drafted_decode_gives_the_same_signals_as_a_full_decode() -> None:
    encoder = create_encoder("timm/efficientnet_lite0", device="cpu")
    names = ("astronaut", "chelsea", "coffee", "rocket")
    datas = [_jpeg(_large(n, (2400, 1600))) for n in names]
    full = [decode_image(d).frames[0] for d in datas]
    drafted = [
        decode_image(d, draft_size=(512, 224), draft_by_orientation=True).frames[0] for d in datas
    ]
    assert all(f.size == (2400, 1600) for f in full)
    assert all(d.size[0] < 1200 for d in drafted)
    cosines = np.sum(encoder.encode(full) * encoder.encode(drafted), axis=1)
    assert cosines.min() >= 0.99, cosines
    distances = [pdq_hash(f).distance(pdq_hash(d)) for f, d in zip(full, drafted, strict=True)]
    # PDQ's match threshold is 31 bits (ThreatExchange); a re-decode stays far below it.
    assert max(distances) <= 16, distances
