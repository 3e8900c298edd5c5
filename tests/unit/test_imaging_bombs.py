"""Safe decoding, RELIABILITY.md I1 and I2: pixel limits and decompression bombs are refused
before any pixel buffer is allocated.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from hostile import encode, png_chunk, png_from_header
from PIL import Image, ImageFile, PngImagePlugin

from moderation.media.decode import (
    DecodeLimits,
    decode_image,
)
from tests.unit.conftest import (
    photo,
    reason_of,
)


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
