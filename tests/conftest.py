"""Fixtures shared by every test: settings in a private data dir, photos, ../shared data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from moderation.config import Settings, load_settings

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED_DIR / "data"

# Photos scikit-image ships inside its wheel: real camera images, no download.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside a developer checkout)")
    return path


def skimage_photo_path(name: str) -> Path:
    """The file of a photo shipped in scikit-image's wheel (``skimage.data``)."""
    from skimage import data

    base = Path(data.__file__).parent
    for candidate in base.iterdir():
        if candidate.stem == name:
            return candidate
    raise FileNotFoundError(name)


def skimage_photo(name: str) -> Image.Image:
    """A scikit-image photo as an RGB Pillow image."""
    with Image.open(skimage_photo_path(name)) as img:
        return img.convert("RGB")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings in a private data dir, with the environment's MODERATION_* cleared."""
    import os

    for key in list(os.environ):
        if key.startswith("MODERATION_"):
            monkeypatch.delenv(key)
    yield load_settings(data_dir=tmp_path / "var")
