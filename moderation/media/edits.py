"""Image edits of the detection-quality benchmark (BENCHMARKS.md), drawn with Pillow.

Each edit is a function ``(image, rng, background) -> image``: an RGB Pillow image in, an RGB
Pillow image out, every random parameter (corner, jitter amounts, text, positions, colours) drawn
from the given :class:`random.Random` only, so that ``(name, image, seed, background)`` fixes the
result. The set and strengths follow the augmentations of the Image Similarity Challenge 2021
(Douze et al. 2021, "The 2021 Image Similarity Dataset and Challenge", arXiv:2106.09672), whose
queries were made with AugLy; AugLy itself is not used because version 1.0 is unmaintained and
breaks on numpy 2 (``np.float``) and Pillow >= 10 (``getsize_multiline``). albumentations is not
used either: its transforms draw their parameters from their own generator, while the benchmark
needs every parameter to come from the one seeded ``random.Random``.

Text uses Pillow's scalable default font (``ImageFont.load_default(size=...)``, Pillow >= 10.1),
so no system font is needed; emoji are drawn as sticker-like shapes because no emoji font is
guaranteed to be installed.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from moderation.media.drawing import (
    RGB,
    STICKER_COLOURS,
    Font,
    default_font,
    jpeg_reencoded,
    random_colour,
    random_words,
    scaled,
    text_size,
)
from moderation.media.screenshots import screenshot

EditFn = Callable[[Image.Image, random.Random, Image.Image | None], Image.Image]


def derived_seed(purpose: str, seed: int, edit: str, index: int) -> int:
    """A 48-bit seed for one edited copy: SHA-256 of ``purpose``, the run's ``seed``, the edit's
    name and the copy's index. Distinct purposes (``"query"``, ``"sample"`` in the benchmark,
    ``"train"`` in classifier training) never share a seed, so training copies are never the
    benchmark's queries. The string keeps its historical ``moderation.benchmark.`` prefix so
    every seed, and every benchmark figure, stays the same."""
    digest = hashlib.sha256(f"moderation.benchmark.{purpose}:{seed}:{edit}:{index}".encode())
    # 48 bits: plenty for distinct seeds, and exact as a JSON number in any language.
    return int.from_bytes(digest.digest()[:6], "big")


# --- geometric and photometric edits -------------------------------------------------------------


def resize_40(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Downscale to 40% of each side (bicubic)."""
    return scaled(image, 0.4)


def jpeg_q15(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Re-encode as JPEG at quality 15 (libjpeg scale, 4:2:0 chroma)."""
    return jpeg_reencoded(image, 15)


def center_crop_70(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Keep the central 70% of each side (49% of the area)."""
    width, height = image.size
    crop_w, crop_h = round(width * 0.7), round(height * 0.7)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def corner_crop_60(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Keep 60% of each side anchored at a random corner (36% of the area)."""
    width, height = image.size
    crop_w, crop_h = round(width * 0.6), round(height * 0.6)
    right_side, bottom_side = rng.choice(
        ((False, False), (True, False), (False, True), (True, True))
    )
    left = width - crop_w if right_side else 0
    top = height - crop_h if bottom_side else 0
    return image.crop((left, top, left + crop_w, top + crop_h))


def largest_inscribed(width: int, height: int, angle: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle inside a ``width`` x ``height`` rectangle rotated by
    ``angle`` radians (the closed form AugLy's ``rotate`` uses, from
    https://stackoverflow.com/a/16778797)."""
    long_side, short_side = max(width, height), min(width, height)
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        half = 0.5 * short_side
        if width >= height:
            return half / sin_a, half / cos_a
        return half / cos_a, half / sin_a
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (width * cos_a - height * sin_a) / cos_2a, (height * cos_a - width * sin_a) / cos_2a


def rotate_15(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Rotate 15° counter-clockwise and crop to the largest rectangle without fill, as AugLy's
    ``rotate`` does (about 70% of the area of a 4:3 photo remains)."""
    angle = 15.0
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    crop_w, crop_h = largest_inscribed(*image.size, math.radians(angle))
    centre_x, centre_y = rotated.width / 2, rotated.height / 2
    box = (
        math.ceil(centre_x - crop_w / 2),
        math.ceil(centre_y - crop_h / 2),
        math.floor(centre_x + crop_w / 2),
        math.floor(centre_y + crop_h / 2),
    )
    return rotated.crop(box)


def hflip(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Mirror left to right."""
    return ImageOps.mirror(image)


def greyscale(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """ITU-R 601-2 luma (Pillow's ``L`` mode), stored as RGB."""
    return image.convert("L").convert("RGB")


def _away_from_one(rng: random.Random, low: float, high: float) -> float:
    """A factor ``1 ± u`` with ``u`` uniform in [low, high], so the change is never negligible."""
    magnitude = rng.uniform(low, high)
    return 1.0 + magnitude if rng.random() < 0.5 else 1.0 - magnitude


def color_jitter(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 1 ± [0.2, 0.4], then hue rotated by
    ± [0.04, 0.1] of a turn (torchvision ``ColorJitter`` semantics, stronger than its defaults)."""
    out = ImageEnhance.Brightness(image).enhance(_away_from_one(rng, 0.2, 0.4))
    out = ImageEnhance.Contrast(out).enhance(_away_from_one(rng, 0.2, 0.4))
    out = ImageEnhance.Color(out).enhance(_away_from_one(rng, 0.2, 0.4))
    shift = round(rng.uniform(0.04, 0.1) * 256) * rng.choice((-1, 1))
    hue, saturation, value = out.convert("HSV").split()
    hue = hue.point([(level + shift) % 256 for level in range(256)])
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def blur_r3(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Gaussian blur with Pillow radius 3 px (standard deviation 3 px)."""
    return image.filter(ImageFilter.GaussianBlur(radius=3))


def border_25(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Pad each side by 25% of the corresponding dimension with one random solid colour (AugLy
    ``pad(w_factor=0.25, h_factor=0.25)``), so the photo keeps 44% of the area."""
    width, height = image.size
    pad_x, pad_y = round(width * 0.25), round(height * 0.25)
    return ImageOps.expand(image, border=(pad_x, pad_y, pad_x, pad_y), fill=random_colour(rng))


def pixelize(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Mosaic: box-downscale to 10% of each side, then nearest-neighbour upscale back to the
    original size (AugLy ``pixelization(ratio=0.1)``, whose default upscale is smooth instead)."""
    width, height = image.size
    small = image.resize(
        (max(1, round(width * 0.1)), max(1, round(height * 0.1))), Image.Resampling.BOX
    )
    return small.resize((width, height), Image.Resampling.NEAREST)


def _perspective_coefficients(
    source: list[tuple[float, float]], target: list[tuple[float, float]]
) -> tuple[float, ...]:
    """The 8 coefficients Pillow's ``Transform.PERSPECTIVE`` needs to map output point ``target[i]``
    to input point ``source[i]`` (a homography solved from four correspondences)."""
    rows: list[list[float]] = []
    values: list[float] = []
    for (x_in, y_in), (x_out, y_out) in zip(source, target, strict=True):
        rows.append([x_out, y_out, 1, 0, 0, 0, -x_in * x_out, -x_in * y_out])
        rows.append([0, 0, 0, x_out, y_out, 1, -y_in * x_out, -y_in * y_out])
        values.extend((x_in, y_in))
    solution = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(values))
    return tuple(float(v) for v in solution)


def perspective(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Perspective warp: each corner moves inward by 5-20% of the width and of the height, black
    outside. AugLy ``perspective_transform`` moves corners by normal offsets of sigma 50 px (10%
    of a 500 px photo) in any direction; inward offsets keep the whole photo in the frame."""
    width, height = image.size
    corners = [(0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height))]
    inward = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    target = [
        (x + sx * rng.uniform(0.05, 0.2) * width, y + sy * rng.uniform(0.05, 0.2) * height)
        for (x, y), (sx, sy) in zip(corners, inward, strict=True)
    ]
    coefficients = _perspective_coefficients(corners, target)
    return image.transform(
        (width, height),
        Image.Transform.PERSPECTIVE,
        coefficients,
        resample=Image.Resampling.BICUBIC,
        fillcolor=(0, 0, 0),
    )


# --- overlays ------------------------------------------------------------------------------------


def text_overlay(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """One or two lines of 1-3 random words in a random colour with a dark outline, 8-15% of the
    height tall, at a random position (AugLy ``overlay_text`` defaults to 15% of the shorter
    side)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    font = default_font(round(height * rng.uniform(0.08, 0.15)))
    stroke = max(1, round(font.size / 14)) if isinstance(font, ImageFont.FreeTypeFont) else 0
    colour = random_colour(rng)
    y = rng.uniform(0.0, 0.6) * height
    for _ in range(rng.randint(1, 2)):
        text = random_words(rng, 1, 3)
        text_w, text_h = text_size(draw, text, font, stroke)
        x = rng.uniform(0, max(1, width - text_w))
        draw.text((x, y), text, font=font, fill=colour, stroke_width=stroke, stroke_fill=(0, 0, 0))
        y += text_h * 1.2
    return out


def _draw_smiley(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.ellipse((0, 0, size - 1, size - 1), fill=(255, 204, 0, 255))
    eye = size // 10
    for eye_x in (size * 0.33, size * 0.67):
        draw.ellipse((eye_x - eye, size * 0.32, eye_x + eye, size * 0.32 + 2.4 * eye), fill="black")
    mouth = (size * 0.22, size * 0.3, size * 0.78, size * 0.8)
    draw.arc(mouth, start=20, end=160, fill=(60, 30, 0, 255), width=max(2, size // 14))
    if rng.random() < 0.5:  # a blush on some faces, so stickers differ beyond colour
        for cheek_x in (size * 0.2, size * 0.8):
            draw.ellipse(
                (cheek_x - eye, size * 0.58, cheek_x + eye, size * 0.58 + eye),
                fill=(255, 120, 120, 200),
            )


def _draw_heart(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    fill = (*colour, 255)
    radius = size * 0.27
    draw.ellipse(
        (size * 0.04, size * 0.1, size * 0.04 + 2 * radius, size * 0.1 + 2 * radius), fill=fill
    )
    draw.ellipse(
        (size * 0.96 - 2 * radius, size * 0.1, size * 0.96, size * 0.1 + 2 * radius), fill=fill
    )
    draw.polygon(
        [(size * 0.06, size * 0.45), (size * 0.94, size * 0.45), (size * 0.5, size * 0.95)],
        fill=fill,
    )


def _draw_star(draw: ImageDraw.ImageDraw, size: int, colour: RGB, rng: random.Random) -> None:
    centre = size / 2
    turn = rng.uniform(0, 2 * math.pi / 5)
    points = []
    for k in range(10):
        radius = centre * (0.98 if k % 2 == 0 else 0.42)
        angle = turn + k * math.pi / 5 - math.pi / 2
        points.append((centre + radius * math.cos(angle), centre + radius * math.sin(angle)))
    draw.polygon(points, fill=(*colour, 255))


def sticker_image(size: int, rng: random.Random) -> Image.Image:
    """An RGBA sticker: a ``size`` px shape drawn at 4x and downscaled (anti-aliasing), inside the
    white outline of cut-out stickers (``size`` / 30 px wide)."""
    big = size * 4
    shape = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shape)
    kind = rng.choice(("smiley", "heart", "star"))
    if kind == "smiley":
        _draw_smiley(draw, big, rng)
    elif kind == "heart":
        _draw_heart(draw, big, rng.choice(STICKER_COLOURS))
    else:
        _draw_star(draw, big, rng.choice(STICKER_COLOURS), rng)
    pad = max(1, size // 30)
    padded = Image.new("RGBA", (size + 2 * pad, size + 2 * pad), (0, 0, 0, 0))
    padded.alpha_composite(shape.resize((size, size), Image.Resampling.LANCZOS), dest=(pad, pad))
    sticker = Image.new("RGBA", padded.size, (255, 255, 255, 0))
    sticker.putalpha(padded.getchannel("A").filter(ImageFilter.MaxFilter(2 * pad + 1)))
    sticker.alpha_composite(padded)
    return sticker


def emoji_overlay(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """One to three emoji-like stickers (smiley, heart, star), each 20-35% of the shorter side,
    at random positions (as AugLy ``overlay_emoji``, with shapes instead of an emoji font)."""
    out = image.convert("RGBA")
    width, height = out.size
    for _ in range(rng.randint(1, 3)):
        size = max(8, round(min(width, height) * rng.uniform(0.2, 0.35)))
        sticker = sticker_image(size, rng)
        position = (
            rng.randint(0, max(0, width - sticker.width)),
            rng.randint(0, max(0, height - sticker.height)),
        )
        out.alpha_composite(sticker, dest=position)
    return out.convert("RGB")


def _wrap_to_width(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and text_size(draw, f"{lines[-1]} {word}", font)[0] <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def meme_caption(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A white band of 20-35% of the height above the photo with a black caption of 2-7 random
    words on at most two centred lines (AugLy ``meme_format``)."""
    width, height = image.size
    band = round(height * rng.uniform(0.2, 0.35))
    out = Image.new("RGB", (width, height + band), (255, 255, 255))
    out.paste(image, (0, band))
    draw = ImageDraw.Draw(out)
    text = random_words(rng, 2, 7)
    size = round(band * 0.42)
    while True:
        font = default_font(size)
        lines = _wrap_to_width(draw, text, font, width * 0.92)
        line_h = text_size(draw, "Ag", font)[1] * 1.25
        if size <= 8 or (len(lines) <= 2 and line_h * len(lines) <= band * 0.9):
            break
        size = round(size * 0.9)
    y = (band - line_h * len(lines)) / 2
    for line in lines:
        draw.text((width / 2, y), line, font=font, fill=(0, 0, 0), anchor="ma")
        y += line_h
    return out


def overlay_bg_60(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """The photo scaled to 60% of each side and pasted at a random position onto another photo,
    which is first scaled and centre-cropped to the photo's size, so the result keeps the input's
    size and the photo covers 36% of it (AugLy ``overlay_onto_background_image``)."""
    if background is None:
        raise ValueError("overlay_bg_60 needs a background image")
    out = ImageOps.fit(background.convert("RGB"), image.size, Image.Resampling.BICUBIC)
    photo = scaled(image, 0.6)
    x = rng.randint(0, out.width - photo.width)
    y = rng.randint(0, out.height - photo.height)
    out.paste(photo, (x, y))
    return out


EDITS: Mapping[str, EditFn] = MappingProxyType(
    {
        "resize_40": resize_40,
        "jpeg_q15": jpeg_q15,
        "center_crop_70": center_crop_70,
        "corner_crop_60": corner_crop_60,
        "rotate_15": rotate_15,
        "hflip": hflip,
        "greyscale": greyscale,
        "color_jitter": color_jitter,
        "blur_r3": blur_r3,
        "text_overlay": text_overlay,
        "emoji_overlay": emoji_overlay,
        "meme_caption": meme_caption,
        "border_25": border_25,
        "pixelize": pixelize,
        "screenshot": screenshot,
        "perspective": perspective,
        "overlay_bg_60": overlay_bg_60,
    }
)
"""The benchmark's edits by name, in the order of BENCHMARKS.md (a read-only mapping)."""

RANDOM_EDITS: frozenset[str] = frozenset(
    {
        "corner_crop_60",
        "color_jitter",
        "text_overlay",
        "emoji_overlay",
        "meme_caption",
        "border_25",
        "screenshot",
        "perspective",
        "overlay_bg_60",
    }
)
"""Edits that draw parameters from the seeded generator; the others ignore the seed."""


def apply_edit(
    name: str, image: Image.Image, *, seed: int, background: Image.Image | None = None
) -> Image.Image:
    """Apply the edit ``name`` to ``image`` with parameters drawn from ``random.Random(seed)``.

    ``image`` is converted to RGB if it is in another mode; the result is a new RGB image (the
    input is not modified) and is the same for the same ``(name, image, seed, background)``.
    ``background`` is the photo ``overlay_bg_60`` pastes onto and is ignored by the other edits.

    Raises:
        ValueError: ``name`` is not in :data:`EDITS` (the message lists the valid names), or
            ``name`` is ``overlay_bg_60`` and ``background`` is None.
    """
    try:
        edit = EDITS[name]
    except KeyError:
        raise ValueError(f"unknown edit {name!r}; valid edits: {', '.join(EDITS)}") from None
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # A seeded, reproducible generator is the point here; nothing is secret.
    out = edit(rgb, random.Random(seed), background)  # noqa: S311
    return out if out.mode == "RGB" else out.convert("RGB")
