"""Drawing primitives shared by the benchmark edits (:mod:`moderation.media.edits`) and the
screenshot edit (:mod:`moderation.media.screenshots`): Pillow's default font and text measure,
random words and colours, a JPEG re-encode, and scaling.

Random draws come from the caller's :class:`random.Random` only, in a fixed order, so that an
edit's result is fixed by its seed.
"""

from __future__ import annotations

import io
import math
import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
"""A font :func:`default_font` returns (FreeType when Pillow has it, else a bitmap font)."""

RGB = tuple[int, int, int]
"""An sRGB colour, each channel 0..255."""

# Words for overlaid text and captions: short, common, and varied in length.
_WORD_TEXT = (
    "lol omg when you the monday mood me nobody literally every time weekend vibes same wait "
    "for it best day ever not again my face they said look at this new post follow like "
    "share viral real fake news today breaking wow so cute check out link in bio 2024 #tbt "
    "#nofilter @friend"
)
WORDS = tuple(_WORD_TEXT.split())
"""Words that overlaid text, captions and screenshot text lines are drawn from."""

STICKER_COLOURS: tuple[RGB, ...] = (
    (255, 204, 0),
    (255, 59, 48),
    (255, 45, 146),
    (52, 199, 89),
    (0, 122, 255),
    (175, 82, 222),
    (255, 149, 0),
)
"""Saturated UI colours (iOS system palette) for stickers and app accents."""


@lru_cache(maxsize=64)
def default_font(size: int) -> Font:
    """Pillow's built-in scalable font at ``size`` px (a bitmap font without FreeType)."""
    return ImageFont.load_default(size=max(6, size))


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Font, stroke: int = 0) -> tuple[int, int]:
    """(width, height) px of ``text`` drawn in ``font`` with a ``stroke`` px outline."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    return math.ceil(right - left), math.ceil(bottom - top)


def random_words(rng: random.Random, low: int, high: int) -> str:
    """``low`` to ``high`` words of :data:`WORDS` (count, then each word, drawn from ``rng``)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def random_colour(rng: random.Random) -> RGB:
    """A uniformly random colour (red, green, blue drawn from ``rng`` in that order)."""
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def jpeg_reencoded(image: Image.Image, quality: int) -> Image.Image:
    """``image`` saved as JPEG at ``quality`` (Pillow's 1-95 scale) and decoded again, as RGB."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def scaled(image: Image.Image, factor: float) -> Image.Image:
    """``image`` resized by ``factor`` on each side (bicubic, at least 1 px)."""
    width, height = image.size
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)
