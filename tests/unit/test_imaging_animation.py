"""Safe decoding, RELIABILITY.md I4 and I6: frame limits of animations, and a hidden frame in a
benign animation is returned.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hostile import encode, minimal_gif
from PIL import Image, ImageFile

from moderation.media import decode as imaging
from moderation.media.decode import (
    DecodeLimits,
    UnscannableImage,
    decode_file,
    decode_image,
)
from moderation.media.pixels import to_rgb
from tests.conftest import skimage_photo_path
from tests.unit.conftest import (
    animation,
    mean_abs_diff,
    photo,
    reason_of,
)


def solid_frames(n: int, size: tuple[int, int] = (32, 24)) -> list[Image.Image]:
    return [
        Image.new("RGB", size, (7 * i % 256, 255 - 11 * i % 256, 40 * i % 256)) for i in range(n)
    ]


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
