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
import io
import math
import random
from collections.abc import Callable, Mapping
from functools import lru_cache
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EditFn = Callable[[Image.Image, random.Random, Image.Image | None], Image.Image]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]

# Words for overlaid text and captions: short, common, and varied in length.
_WORD_TEXT = (
    "lol omg when you the monday mood me nobody literally every time weekend vibes same wait "
    "for it best day ever not again my face they said look at this new post follow like "
    "share viral real fake news today breaking wow so cute check out link in bio 2024 #tbt "
    "#nofilter @friend"
)
_WORDS = tuple(_WORD_TEXT.split())

_STICKER_COLOURS: tuple[RGB, ...] = (
    (255, 204, 0),
    (255, 59, 48),
    (255, 45, 146),
    (52, 199, 89),
    (0, 122, 255),
    (175, 82, 222),
    (255, 149, 0),
)


@lru_cache(maxsize=64)
def _font(size: int) -> Font:
    """Pillow's built-in scalable font at ``size`` px (a bitmap font without FreeType)."""
    return ImageFont.load_default(size=max(6, size))


def derived_seed(purpose: str, seed: int, edit: str, index: int) -> int:
    """A 48-bit seed for one edited copy: SHA-256 of ``purpose``, the run's ``seed``, the edit's
    name and the copy's index. Distinct purposes (``"query"``, ``"sample"`` in the benchmark,
    ``"train"`` in classifier training) never share a seed, so training copies are never the
    benchmark's queries. The string keeps its historical ``moderation.benchmark.`` prefix so
    every seed, and every benchmark figure, stays the same."""
    digest = hashlib.sha256(f"moderation.benchmark.{purpose}:{seed}:{edit}:{index}".encode())
    # 48 bits: plenty for distinct seeds, and exact as a JSON number in any language.
    return int.from_bytes(digest.digest()[:6], "big")


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: Font, stroke: int = 0
) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    return math.ceil(right - left), math.ceil(bottom - top)


def _random_words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _random_colour(rng: random.Random) -> RGB:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    width, height = image.size
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


# --- geometric and photometric edits -------------------------------------------------------------


def resize_40(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Downscale to 40% of each side (bicubic)."""
    return _scaled(image, 0.4)


def jpeg_q15(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Re-encode as JPEG at quality 15 (libjpeg scale, 4:2:0 chroma)."""
    return _jpeg(image, 15)


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


def _largest_inscribed(width: int, height: int, angle: float) -> tuple[float, float]:
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
    crop_w, crop_h = _largest_inscribed(*image.size, math.radians(angle))
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
    return ImageOps.expand(image, border=(pad_x, pad_y, pad_x, pad_y), fill=_random_colour(rng))


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
    font = _font(round(height * rng.uniform(0.08, 0.15)))
    stroke = max(1, round(font.size / 14)) if isinstance(font, ImageFont.FreeTypeFont) else 0
    colour = _random_colour(rng)
    y = rng.uniform(0.0, 0.6) * height
    for _ in range(rng.randint(1, 2)):
        text = _random_words(rng, 1, 3)
        text_w, text_h = _text_size(draw, text, font, stroke)
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


def _sticker(size: int, rng: random.Random) -> Image.Image:
    """An RGBA sticker: a ``size`` px shape drawn at 4x and downscaled (anti-aliasing), inside the
    white outline of cut-out stickers (``size`` / 30 px wide)."""
    big = size * 4
    shape = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shape)
    kind = rng.choice(("smiley", "heart", "star"))
    if kind == "smiley":
        _draw_smiley(draw, big, rng)
    elif kind == "heart":
        _draw_heart(draw, big, rng.choice(_STICKER_COLOURS))
    else:
        _draw_star(draw, big, rng.choice(_STICKER_COLOURS), rng)
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
        sticker = _sticker(size, rng)
        position = (
            rng.randint(0, max(0, width - sticker.width)),
            rng.randint(0, max(0, height - sticker.height)),
        )
        out.alpha_composite(sticker, dest=position)
    return out.convert("RGB")


def _wrap_to_width(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and _text_size(draw, f"{lines[-1]} {word}", font)[0] <= max_width:
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
    text = _random_words(rng, 2, 7)
    size = round(band * 0.42)
    while True:
        font = _font(size)
        lines = _wrap_to_width(draw, text, font, width * 0.92)
        line_h = _text_size(draw, "Ag", font)[1] * 1.25
        if size <= 8 or (len(lines) <= 2 and line_h * len(lines) <= band * 0.9):
            break
        size = round(size * 0.9)
    y = (band - line_h * len(lines)) / 2
    for line in lines:
        draw.text((width / 2, y), line, font=font, fill=(0, 0, 0), anchor="ma")
        y += line_h
    return out


def _ui_palette(rng: random.Random) -> dict[str, RGB]:
    accent = rng.choice(_STICKER_COLOURS)
    if rng.random() < 0.5:
        return {
            "bg": (255, 255, 255),
            "bar": (246, 246, 248),
            "text": (20, 20, 20),
            "muted": (200, 200, 205),
            "accent": accent,
        }
    return {
        "bg": (16, 16, 18),
        "bar": (32, 32, 36),
        "text": (235, 235, 235),
        "muted": (80, 80, 88),
        "accent": accent,
    }


def _text_lines(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    rng: random.Random,
    palette: Mapping[str, RGB],
    font: Font,
) -> None:
    """Fill ``box`` with a few lines of real words, then grey placeholder bars (loading text)."""
    left, top, right, bottom = box
    line_h = _text_size(draw, "Ag", font)[1] * 1.5
    y = top
    for index in range(rng.randint(1, 3)):
        if y + line_h > bottom:
            return
        colour = palette["text"] if index == 0 else palette["muted"]
        words = _random_words(rng, 3, 8)
        while words and _text_size(draw, words, font)[0] > right - left:
            words = words.rsplit(" ", 1)[0] if " " in words else ""
        draw.text((left, y), words, font=font, fill=colour)
        y += line_h
    while y + line_h <= bottom:
        bar_right = left + (right - left) * rng.uniform(0.4, 1.0)
        draw.rounded_rectangle(
            (left, y + line_h * 0.2, bar_right, y + line_h * 0.75), radius=3, fill=palette["muted"]
        )
        y += line_h


def _status_bar(
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    font = _font(round(height * 0.55))
    clock = f"{rng.randint(7, 23)}:{rng.randint(0, 59):02d}"
    draw.text((height * 0.8, height / 2), clock, font=font, fill=palette["text"], anchor="lm")
    battery_w, battery_h = height * 1.1, height * 0.5
    x1, y0 = width - height * 0.6, (height - battery_h) / 2
    draw.rounded_rectangle(
        (x1 - battery_w, y0, x1, y0 + battery_h), radius=2, outline=palette["text"]
    )
    level = rng.uniform(0.2, 1.0)
    draw.rectangle(
        (
            x1 - battery_w + 2,
            y0 + 2,
            x1 - battery_w + 2 + (battery_w - 4) * level,
            y0 + battery_h - 2,
        ),
        fill=palette["text"],
    )
    for k in range(4):  # signal bars
        bar_x = x1 - battery_w - height * (1.6 - 0.25 * k)
        draw.rectangle(
            (bar_x, y0 + battery_h * (1 - 0.25 * (k + 1)), bar_x + height * 0.15, y0 + battery_h),
            fill=palette["text"],
        )


def _app_header(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    left, top, right, bottom = box
    height = bottom - top
    draw.rectangle(box, fill=palette["bar"])
    middle = (top + bottom) / 2
    draw.line(
        (left + height * 0.45, middle, left + height * 0.25, middle - height * 0.18),
        fill=palette["text"],
        width=3,
    )
    draw.line(
        (left + height * 0.25, middle, left + height * 0.45, middle + height * 0.18),
        fill=palette["text"],
        width=3,
    )
    radius = height * 0.3
    avatar_x = left + height * 0.9
    draw.ellipse(
        (avatar_x, middle - radius, avatar_x + 2 * radius, middle + radius), fill=palette["accent"]
    )
    title = rng.choice(
        ("@" + rng.choice(_WORDS) + str(rng.randint(1, 999)), "Photos", "Feed", "Chat")
    )
    draw.text(
        (avatar_x + 2.6 * radius, middle),
        title,
        font=_font(round(height * 0.38)),
        fill=palette["text"],
        anchor="lm",
    )
    for k in range(3):  # the "more" menu dots
        draw.ellipse(
            (
                right - height * 0.4 - 1.5,
                middle - height * 0.18 + k * height * 0.18 - 1.5,
                right - height * 0.4 + 1.5,
                middle - height * 0.18 + k * height * 0.18 + 1.5,
            ),
            fill=palette["text"],
        )


def _buttons(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    """A row of icon-like buttons and one labelled pill button, as under a social media post."""
    left, top, right, bottom = box
    size = bottom - top
    x = left
    for _ in range(3):
        draw.ellipse((x, top, x + size, bottom), outline=palette["text"], width=2)
        x += size * 1.6
    label = rng.choice(("Follow", "Share", "Reply", "Send", "Save"))
    font = _font(round(size * 0.55))
    label_w = _text_size(draw, label, font)[0]
    pill = (right - label_w - size * 1.2, top, right, bottom)
    draw.rounded_rectangle(pill, radius=size / 2, fill=palette["accent"])
    draw.text(
        ((pill[0] + pill[2]) / 2, (top + bottom) / 2),
        label,
        font=font,
        fill=(255, 255, 255),
        anchor="mm",
    )


def screenshot(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A screenshot of the photo in an app: a phone (portrait) or desktop (sidebar) layout with a
    status bar, an app header, text lines and buttons around the photo, which takes 35-60% of the
    canvas area; then a JPEG re-encode at quality 70-90 as when the screenshot is shared."""
    share = rng.uniform(0.35, 0.6)
    palette = _ui_palette(rng)
    photo = _scaled(image, rng.uniform(0.8, 1.2))
    photo_w, photo_h = photo.size
    unit = max(12, round(max(photo_w, photo_h) / 22))  # chrome scales with the photo's size
    if rng.random() < 0.6:
        margin = rng.choice((0, unit // 2))
        canvas_w = photo_w + 2 * margin
        chrome_top = round(unit * 1.1) + round(unit * 2.2)
        min_h = chrome_top + photo_h + round(unit * 1.6) + 2 * unit + round(unit * 2.2)
        # A tall portrait photo at a low share would need a scrolling screenshot taller than
        # phones are (about 2.2:1), so the canvas stops at 2.4:1 and the share rises instead.
        canvas_h = max(
            min_h, min(round(2.4 * canvas_w), round(photo_w * photo_h / (share * canvas_w)))
        )
        photo_box = (margin, chrome_top + unit // 2)
        canvas = Image.new("RGB", (canvas_w, canvas_h), palette["bg"])
        draw = ImageDraw.Draw(canvas)
        _status_bar(draw, canvas_w, round(unit * 1.1), palette, rng)
        _app_header(draw, (0, round(unit * 1.1), canvas_w, chrome_top), palette, rng)
        below = photo_box[1] + photo_h + unit // 2
        _buttons(
            draw,
            (unit * 0.6, below, canvas_w - unit * 0.6, below + round(unit * 1.1)),
            palette,
            rng,
        )
        nav_top = canvas_h - round(unit * 2.2)
        _text_lines(
            draw,
            (unit * 0.6, below + unit * 1.6, canvas_w - unit * 0.6, nav_top),
            rng,
            palette,
            _font(round(unit * 0.7)),
        )
        draw.rectangle((0, nav_top, canvas_w, canvas_h), fill=palette["bar"])
        for k in range(5):  # bottom navigation icons
            centre = canvas_w * (k + 0.5) / 5
            draw.rounded_rectangle(
                (
                    centre - unit * 0.45,
                    nav_top + unit * 0.65,
                    centre + unit * 0.45,
                    nav_top + unit * 1.55,
                ),
                radius=unit * 0.2,
                outline=palette["text"],
                width=2,
            )
    else:
        top_bar = round(unit * 2.2)
        canvas_h = top_bar + photo_h + 4 * unit
        sidebar = round(unit * rng.uniform(5, 8))
        min_w = sidebar + photo_w + 2 * unit
        canvas_w = max(min_w, round(photo_w * photo_h / (share * canvas_h)))
        canvas = Image.new("RGB", (canvas_w, canvas_h), palette["bg"])
        draw = ImageDraw.Draw(canvas)
        _app_header(draw, (0, 0, canvas_w, top_bar), palette, rng)
        draw.rectangle((0, top_bar, sidebar, canvas_h), fill=palette["bar"])
        _text_lines(
            draw,
            (unit * 0.5, top_bar + unit, sidebar - unit * 0.5, canvas_h - unit),
            rng,
            palette,
            _font(round(unit * 0.6)),
        )
        column = canvas_w - sidebar - photo_w
        photo_box = (sidebar + round(column * rng.uniform(0.1, 0.5)), top_bar + unit)
        _buttons(
            draw,
            (
                photo_box[0],
                photo_box[1] + photo_h + unit * 0.8,
                photo_box[0] + photo_w,
                photo_box[1] + photo_h + unit * 1.8,
            ),
            palette,
            rng,
        )
        text_left = photo_box[0] + photo_w + unit
        if canvas_w - text_left > 3 * unit:
            _text_lines(
                draw,
                (text_left, top_bar + unit, canvas_w - unit, canvas_h - unit),
                rng,
                palette,
                _font(round(unit * 0.7)),
            )
    canvas.paste(photo, photo_box)
    return _jpeg(canvas, rng.randint(70, 90))


def overlay_bg_60(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """The photo scaled to 60% of each side and pasted at a random position onto another photo,
    which is first scaled and centre-cropped to the photo's size, so the result keeps the input's
    size and the photo covers 36% of it (AugLy ``overlay_onto_background_image``)."""
    if background is None:
        raise ValueError("overlay_bg_60 needs a background image")
    out = ImageOps.fit(background.convert("RGB"), image.size, Image.Resampling.BICUBIC)
    photo = _scaled(image, 0.6)
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
