"""Unseen implementations of the benchmark's edit families built on albumentations (and three
drawn with Pillow), for the registry :mod:`moderation.media.implementations`.

albumentations draws its parameters from its own generator; each call here builds a
``Compose(..., seed=...)`` whose seed comes from the caller's :class:`random.Random`, so the
result is still fixed by ``(implementation, image, seed)``. Parameter ranges differ from the
tuning implementations' on purpose (other libraries' defaults, other strengths), as edits made
by code the system was never tuned on would.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from moderation.media.drawing import default_font, random_colour, random_words, text_size


def _run(image: Image.Image, rng: random.Random, transforms: list[Any]) -> Image.Image:
    """``transforms`` applied with a seed drawn from ``rng``; RGB in, RGB out."""
    compose = A.Compose(transforms, seed=rng.randrange(2**31))
    out = compose(image=np.asarray(image.convert("RGB")))["image"]
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB")


def albu_resize(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Downscale to 25-50% of each side with OpenCV area interpolation."""
    f = rng.uniform(0.25, 0.5)
    h, w = max(8, round(image.height * f)), max(8, round(image.width * f))
    return _run(image, rng, [A.Resize(h, w, interpolation=cv2.INTER_AREA)])


def albu_compression(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """WebP or JPEG at quality 8-30 (libwebp / OpenCV's libjpeg)."""
    kind = rng.choice(("jpeg", "webp"))
    return _run(image, rng, [A.ImageCompression(compression_type=kind, quality_range=(8, 30), p=1)])


def albu_center_crop(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Centre crop of 55-80% of each side, each side drawn apart."""
    h = max(8, round(image.height * rng.uniform(0.55, 0.8)))
    w = max(8, round(image.width * rng.uniform(0.55, 0.8)))
    return _run(image, rng, [A.CenterCrop(h, w)])


def albu_random_crop(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """``RandomResizedCrop``: 30-60% of the area at aspect 3:4-4:3, resized to 80% of the input."""
    size = (max(8, round(image.height * 0.8)), max(8, round(image.width * 0.8)))
    return _run(image, rng, [A.RandomResizedCrop(size=size, scale=(0.3, 0.6), p=1)])


def albu_grey(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Greyscale by another formula (desaturation, average or PCA) or sepia, then brightness and
    contrast ±15%."""
    method = rng.choice(("desaturation", "average", "pca", "sepia"))
    first: Any = A.ToSepia(p=1) if method == "sepia" else A.ToGray(method=method, p=1)
    return _run(image, rng, [first, A.RandomBrightnessContrast(0.15, 0.15, p=1)])


def albu_colour(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """``ColorJitter`` (brightness, contrast, saturation 0.6-1.4, hue ±0.12) then gamma 0.6-1.6."""
    jitter = A.ColorJitter((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.12, 0.12), p=1)
    return _run(image, rng, [jitter, A.RandomGamma((60, 160), p=1)])


def albu_blur(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Motion blur (7-15 px kernel), defocus (radius 3-6 px) or median blur (7-11 px)."""
    kind = rng.choice(("motion", "defocus", "median"))
    if kind == "motion":
        blur: Any = A.MotionBlur(blur_limit=(7, 15), p=1)
    elif kind == "defocus":
        blur = A.Defocus(radius=(3, 6), p=1)
    else:
        blur = A.MedianBlur(blur_limit=(7, 11), p=1)
    return _run(image, rng, [blur])


def albu_pixelize(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """``Downscale`` to 7-15% of the side with area sampling, back up with nearest neighbour."""
    pair = {"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_NEAREST}
    return _run(image, rng, [A.Downscale(scale_range=(0.07, 0.15), interpolation_pair=pair, p=1)])


def albu_perspective(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """``Perspective`` with corner offsets of 5-12% of the side, the whole warped photo kept
    (``fit_output``) on a random fill colour."""
    fill = random_colour(rng)
    return _run(image, rng, [A.Perspective(scale=(0.05, 0.12), fit_output=True, fill=fill, p=1)])


def albu_flip_affine(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Horizontal flip, then an affine map (scale 70-95%, rotation ±12°, shift ±8%) with a
    random fill, then padding to a square with reflected edges."""
    side = max(image.size)
    transforms = [
        A.HorizontalFlip(p=1),
        A.Affine(
            scale=(0.7, 0.95),
            rotate=(-12, 12),
            translate_percent=(-0.08, 0.08),
            fill=random_colour(rng),
            p=1,
        ),
        A.PadIfNeeded(
            min_height=side, min_width=side, border_mode=cv2.BORDER_REFLECT_101, position="random"
        ),
    ]
    return _run(image, rng, transforms)


def albu_rotate_reflect(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Rotation by 10-30° either way with reflected borders (OpenCV ``BORDER_REFLECT_101``)."""
    angle = rng.uniform(10, 30)
    limit = (angle, angle) if rng.random() < 0.5 else (-angle, -angle)
    return _run(image, rng, [A.Rotate(limit=limit, border_mode=cv2.BORDER_REFLECT_101, p=1)])


def banner_text(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A semi-transparent band (15-30% of the height) across the photo with 2-6 white words, or a
    faint diagonal watermark repeated three times."""
    out = image.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = out.size
    if rng.random() < 0.5:
        band = round(h * rng.uniform(0.15, 0.3))
        top = rng.randint(0, h - band)
        draw.rectangle((0, top, w, top + band), fill=(0, 0, 0, rng.randint(110, 190)))
        font = default_font(round(band * 0.45))
        draw.text(
            (w / 2, top + band / 2),
            random_words(rng, 2, 6),
            font=font,
            fill=(255, 255, 255, 255),
            anchor="mm",
        )
    else:
        font = default_font(round(h * rng.uniform(0.08, 0.14)))
        text = random_words(rng, 1, 3)
        for k in range(3):
            draw.text(
                (w * rng.uniform(0, 0.4), h * (0.15 + 0.3 * k)),
                text,
                font=font,
                fill=(255, 255, 255, rng.randint(90, 150)),
            )
        layer = layer.rotate(rng.uniform(-30, 30))
    out.alpha_composite(layer)
    return out.convert("RGB")


def top_bottom_meme(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """The classic meme: black bars of 10-18% of the height above and below, white outlined
    words in both bars and over the photo's top edge."""
    w, h = image.size
    bar = round(h * rng.uniform(0.1, 0.18))
    out = Image.new("RGB", (w, h + 2 * bar), (0, 0, 0))
    out.paste(image, (0, bar))
    draw = ImageDraw.Draw(out)
    for y in (bar * 0.5, h + bar * 1.5):
        font = default_font(round(bar * 0.6))
        text = random_words(rng, 2, 5).upper()
        while text_size(draw, text, font)[0] > w * 0.95 and " " in text:
            text = text.rsplit(" ", 1)[0]
        draw.text(
            (w / 2, y),
            text,
            font=font,
            fill=(255, 255, 255),
            anchor="mm",
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
    return out


def blurred_border(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Uneven padding (10-35% of the side per side) filled with a blurred, stretched copy of the
    photo, as "fit to square" apps do."""
    w, h = image.size
    left, right = (round(w * rng.uniform(0.1, 0.35)) for _ in range(2))
    top, bottom = (round(h * rng.uniform(0.1, 0.35)) for _ in range(2))
    size = (w + left + right, h + top + bottom)
    back = ImageOps.fit(image, size, Image.Resampling.BILINEAR).filter(
        ImageFilter.GaussianBlur(max(3, w // 15))
    )
    back.paste(image, (left, top))
    return back
