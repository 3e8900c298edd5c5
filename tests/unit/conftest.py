"""Shared helpers of the unit tests, by the topic whose files use them: random unit vectors and
ids (``test_index_*.py``); photos, image comparison and unscannable reasons (``test_imaging_*.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hostile import encode
from PIL import Image

from moderation.media.decode import (
    UNSCANNABLE_REASONS,
    UnscannableImage,
)
from tests.conftest import skimage_photo

# --- signal indexes (test_index_*.py) ------------------------------------------------------


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(10**12, size=n, replace=False).astype(np.int64)


# --- safe decoding (test_imaging_*.py) ---------------------------------------------------


def small(image: Image.Image, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Box-filtered to a small size as float: removes dither and codec noise before comparing."""
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(small(a) - small(b)).mean())


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(UnscannableImage) as caught:
        call()
    assert caught.value.reason in UNSCANNABLE_REASONS
    return caught.value.reason


def animation(frames: list[Image.Image], fmt: str) -> bytes:
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt in ("GIF", "PNG", "WEBP"):
        params["duration"] = 40
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params)


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    image: Image.Image = skimage_photo(name)
    return image.resize(size, Image.Resampling.LANCZOS) if size else image
