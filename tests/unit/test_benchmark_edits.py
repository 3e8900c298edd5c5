"""The benchmark's image edits: contract (RGB, deterministic, seeded) and each edit's geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from moderation.media.edits import EDITS, RANDOM_EDITS, apply_edit
from tests.conftest import skimage_photo

EXPECTED_ORDER = (
    "resize_40", "jpeg_q15", "center_crop_70", "corner_crop_60", "rotate_15", "hflip",
    "greyscale", "color_jitter", "blur_r3", "text_overlay", "emoji_overlay", "meme_caption",
    "border_25", "pixelize", "screenshot", "perspective", "overlay_bg_60",
)  # fmt: skip


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return skimage_photo("chelsea")  # 451 x 300 px


@pytest.fixture(scope="module")
def background() -> Image.Image:
    return skimage_photo("coffee")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_edit_names_in_benchmarks_order() -> None:
    assert tuple(EDITS) == EXPECTED_ORDER
    assert RANDOM_EDITS.issubset(EDITS)


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_edit_contract(name: str, photo: Image.Image, background: Image.Image) -> None:
    before = photo.tobytes()
    out = apply_edit(name, photo, seed=3, background=background)
    again = apply_edit(name, photo, seed=3, background=background)

    assert out.mode == "RGB"
    assert photo.tobytes() == before, "the input must not be modified"
    assert (out.size, out.tobytes()) == (again.size, again.tobytes()), "same seed, same result"
    # Changed: a new size, or more than 1% of the pixels moved by more than 10 grey levels.
    if out.size == photo.size:
        assert (np.abs(pixels(out) - pixels(photo)).max(axis=2) > 10).mean() > 0.01
    width_ratio, height_ratio = out.width / photo.width, out.height / photo.height
    assert 0.35 <= width_ratio <= 4 and 0.35 <= height_ratio <= 4, out.size
    assert 0.1 <= width_ratio * height_ratio <= 6, out.size


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_seed_changes_only_random_edits(
    name: str, photo: Image.Image, background: Image.Image
) -> None:
    outputs = {
        (out.size, out.tobytes())
        for out in (apply_edit(name, photo, seed=s, background=background) for s in range(6))
    }
    if name in RANDOM_EDITS:
        # corner_crop_60 has four outcomes, so two seeds may agree; six seeds may not all agree.
        assert len(outputs) > 1
    else:
        assert len(outputs) == 1


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_edits_accept_tiny_and_non_rgb_images(name: str) -> None:
    tiny = Image.new("RGBA", (24, 16), (200, 40, 40, 255))
    out = apply_edit(name, tiny, seed=0, background=Image.new("L", (30, 30), 90))
    assert out.mode == "RGB"
    assert out.width >= 1 and out.height >= 1


def test_unknown_edit_lists_valid_names(photo: Image.Image) -> None:
    with pytest.raises(ValueError, match=r"unknown edit 'swirl'.*resize_40.*overlay_bg_60"):
        apply_edit("swirl", photo, seed=0)


def test_overlay_needs_a_background(photo: Image.Image) -> None:
    with pytest.raises(ValueError, match="background"):
        apply_edit("overlay_bg_60", photo, seed=0)


def test_resize_and_crops_geometry(photo: Image.Image) -> None:
    width, height = photo.size
    assert apply_edit("resize_40", photo, seed=0).size == (round(width * 0.4), round(height * 0.4))

    centre = apply_edit("center_crop_70", photo, seed=0)
    crop_w, crop_h = round(width * 0.7), round(height * 0.7)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    assert centre.tobytes() == photo.crop((left, top, left + crop_w, top + crop_h)).tobytes()

    crop_w, crop_h = round(width * 0.6), round(height * 0.6)
    corners = {
        photo.crop((x, y, x + crop_w, y + crop_h)).tobytes()
        for x in (0, width - crop_w)
        for y in (0, height - crop_h)
    }
    seen = {apply_edit("corner_crop_60", photo, seed=s).tobytes() for s in range(12)}
    assert seen <= corners
    assert len(seen) >= 3, "twelve seeds should reach at least three of the four corners"


def test_hflip_greyscale_and_border(photo: Image.Image) -> None:
    assert ImageOps.mirror(apply_edit("hflip", photo, seed=0)).tobytes() == photo.tobytes()

    grey = pixels(apply_edit("greyscale", photo, seed=0))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    bordered = apply_edit("border_25", photo, seed=0)
    pad_x, pad_y = round(photo.width * 0.25), round(photo.height * 0.25)
    assert bordered.size == (photo.width + 2 * pad_x, photo.height + 2 * pad_y)
    inner = bordered.crop((pad_x, pad_y, pad_x + photo.width, pad_y + photo.height))
    assert inner.tobytes() == photo.tobytes()
    frame = pixels(bordered)[:pad_y].reshape(-1, 3)
    assert (frame == frame[0]).all(), "the border is one solid colour"


def test_rotation_is_cropped_without_fill() -> None:
    white = Image.new("RGB", (400, 300), (255, 255, 255))
    rotated = pixels(apply_edit("rotate_15", white, seed=0))
    assert rotated.shape[1] < 400 and rotated.shape[0] < 300
    # Interpolation may darken a one-pixel rim a little, never to the black of a fill.
    assert rotated.min() > 150


def test_perspective_leaves_black_corners(photo: Image.Image) -> None:
    warped = pixels(apply_edit("perspective", photo, seed=1))
    assert warped.shape[:2] == (photo.height, photo.width)
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert (warped[y, x] == 0).all()
    assert warped.mean() > 0.4 * pixels(photo).mean(), "most of the photo remains"


def test_meme_caption_band_above_the_photo(photo: Image.Image) -> None:
    meme = apply_edit("meme_caption", photo, seed=2)
    band = meme.height - photo.height
    assert 0.2 * photo.height - 1 <= band <= 0.35 * photo.height + 1
    assert meme.crop((0, band, meme.width, meme.height)).tobytes() == photo.tobytes()
    caption = pixels(meme.crop((0, 0, meme.width, band))).min(axis=2)
    dark = (caption < 80).mean()
    assert (caption > 250).mean() > 0.6 and 0.005 < dark < 0.3, "white band with black text"


@pytest.mark.parametrize("name", ["text_overlay", "emoji_overlay"])
def test_overlays_cover_part_of_the_photo(name: str, photo: Image.Image) -> None:
    for seed in range(4):
        out = apply_edit(name, photo, seed=seed)
        assert out.size == photo.size
        changed = (np.abs(pixels(out) - pixels(photo)).max(axis=2) > 30).mean()
        assert 0.005 < changed < 0.6, (seed, changed)


def _colour_share(image: Image.Image, colour: tuple[int, int, int], tolerance: int) -> float:
    return float((np.abs(pixels(image) - np.array(colour)).max(axis=2) <= tolerance).mean())


def test_overlay_background_at_60_percent() -> None:
    red = Image.new("RGB", (200, 100), (255, 0, 0))
    blue = Image.new("RGB", (300, 300), (0, 0, 255))
    out = apply_edit("overlay_bg_60", red, seed=5, background=blue)
    assert out.size == red.size
    assert _colour_share(out, (255, 0, 0), 0) == pytest.approx(0.36, abs=0.01)
    assert _colour_share(out, (0, 0, 255), 0) == pytest.approx(0.64, abs=0.01)


def test_screenshot_embeds_the_photo_in_a_larger_canvas() -> None:
    # A colour no UI element uses, so its pixels after the JPEG re-encode are the photo's.
    colour = (240, 20, 180)
    for size in ((450, 300), (300, 450)):
        flat = Image.new("RGB", size, colour)
        for seed in range(6):
            shot = apply_edit("screenshot", flat, seed=seed)
            share = _colour_share(shot, colour, 24)
            assert 0.3 <= share <= 0.67, (size, seed, share)
