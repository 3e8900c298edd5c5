"""Images of ``moderation benchmark load``: a small block bank and a pool of uploads whose
expected decision is known by construction.

- Bank: three of scikit-image's sample photos (``skimage.data``, shipped in its wheel, no
  download), long side 256 px, JPEG quality 85.
- Copies: each bank photo through one of the benchmark's robust edits
  (:data:`moderation.media.edits.EDITS`: JPEG quality 15, resize to 40%, greyscale, colour
  jitter, horizontal flip), then rescaled (long side 160-320 px) and re-encoded (JPEG
  quality 70-95) so every file differs: expected ``block`` or ``review``.
- Unrelated: random crops (30-90% of each side) of other scikit-image photos, and generated
  pictures (gradient and random shapes), long side 96-256 px: expected ``allow``.

All draws come from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from moderation.media.edits import apply_edit

BANK_PHOTOS = ("astronaut", "chelsea", "coffee")
UNRELATED_PHOTOS = (
    "rocket",
    "hubble_deep_field",
    "camera",
    "coins",
    "moon",
    "immunohistochemistry",
    "brick",
    "grass",
)
COPY_EDITS = ("jpeg_q15", "resize_40", "greyscale", "color_jitter", "hflip")
FLAGGED = frozenset({"block", "review"})


@dataclass(frozen=True)
class PoolImage:
    """One upload of the pool: JPEG ``data``, what it is (``copy:<photo>:<edit>``,
    ``crop:<photo>`` or ``generated``) and the decisions that count as right."""

    data: bytes
    kind: str
    expected: frozenset[str]


def sample_photo(name: str) -> Image.Image:
    """A scikit-image sample photo (``skimage.data.<name>()``) as an RGB image.

    Raises:
        AttributeError: this scikit-image has no such sample.
    """
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(array)).convert("RGB")


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    """``image`` encoded as a baseline JPEG at ``quality`` (libjpeg scale)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def bank_photos(size: int = 256) -> dict[str, bytes]:
    """The bank: :data:`BANK_PHOTOS` with their long side ``size`` px, JPEG q85, by name."""
    out = {}
    for name in BANK_PHOTOS:
        image = sample_photo(name)
        image.thumbnail((size, size))
        out[name] = jpeg(image)
    return out


def _rescaled_jpeg(image: Image.Image, rng: np.random.Generator, low: int, high: int) -> bytes:
    image = image.copy()
    side = int(rng.integers(low, high + 1))
    image.thumbnail((side, side))
    return jpeg(image, quality=int(rng.integers(70, 96)))


def _copy(rng: np.random.Generator, bank: dict[str, Image.Image]) -> PoolImage:
    name = BANK_PHOTOS[int(rng.integers(len(BANK_PHOTOS)))]
    edit = COPY_EDITS[int(rng.integers(len(COPY_EDITS)))]
    edited = apply_edit(edit, bank[name], seed=int(rng.integers(2**31)))
    return PoolImage(_rescaled_jpeg(edited, rng, 160, 320), f"copy:{name}:{edit}", FLAGGED)


def _crop(rng: np.random.Generator, photos: dict[str, Image.Image]) -> PoolImage:
    name = UNRELATED_PHOTOS[int(rng.integers(len(UNRELATED_PHOTOS)))]
    photo = photos[name]
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    return PoolImage(_rescaled_jpeg(crop, rng, 96, 256), f"crop:{name}", frozenset({"allow"}))


def _generated(rng: np.random.Generator) -> PoolImage:
    w, h = (int(v) for v in rng.integers(96, 257, size=2))
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    pixels = np.broadcast_to(a + (b - a) * ramp, (h, w, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 8, w + 1)), int(rng.integers(y0 + 8, h + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    data = jpeg(image, quality=int(rng.integers(70, 96)))
    return PoolImage(data, "generated", frozenset({"allow"}))


def upload_pool(size: int, seed: int = 0, copy_share: float = 0.4) -> list[PoolImage]:
    """``size`` distinct uploads: about ``copy_share`` of them edited copies of the bank's
    photos, the rest unrelated crops (two thirds) and generated pictures (one third), in a
    seeded random order.

    Raises:
        ValueError: ``size`` < 1 or ``copy_share`` outside [0, 1].
    """
    if size < 1 or not 0.0 <= copy_share <= 1.0:
        raise ValueError(f"upload_pool: size {size} < 1 or copy_share {copy_share} not in [0, 1]")
    rng = np.random.default_rng(seed)
    bank = {name: sample_photo(name) for name in BANK_PHOTOS}
    others = {name: sample_photo(name) for name in UNRELATED_PHOTOS}
    pool = []
    for _ in range(size):
        draw = rng.random()
        if draw < copy_share:
            pool.append(_copy(rng, bank))
        elif draw < copy_share + (1.0 - copy_share) * 2 / 3:
            pool.append(_crop(rng, others))
        else:
            pool.append(_generated(rng))
    return pool
