"""PDQ through pdqhash's compiled functions: the same luma and digests as pdqhash's entry points."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pdqhash
import pytest
from PIL import Image

from moderation.signals import pdq
from moderation.signals.pdq import PdqHash, pdq_hash, pdq_hash_dihedral
from moderation.signals.pdq_native import luma_of, native_pdq
from tests.conftest import SKIMAGE_PHOTOS, skimage_photo


def _reference(image: Image.Image, max_side: int | None) -> tuple[PdqHash, tuple[PdqHash, ...]]:
    """pdqhash's own entry points on the pixels the module hashes."""
    pixels = np.asarray(pdq._hashable(image, max_side), dtype=np.uint8)
    bits, quality = pdqhash.compute(pixels)
    variants, dihedral_quality = pdqhash.compute_dihedral(pixels)
    plain = PdqHash(pdq._pack(bits), int(quality))
    return plain, tuple(PdqHash(pdq._pack(v), int(dihedral_quality)) for v in variants)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.skipif(sys.platform != "linux", reason="the mangled names are checked on Linux")
def test_the_direct_entry_points_are_found_and_pass_their_check() -> None:
    assert native_pdq() is not None


def test_pillow_float_luma_equals_pdqhash_luma_for_every_rgb_value() -> None:
    green, blue = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for red in range(256):
        pixels = np.stack([np.full_like(green, red), green, blue], axis=-1).astype(np.uint8)
        pillow = np.asarray(Image.fromarray(pixels, "RGB").convert("F"))
        assert np.array_equal(pillow, luma_of(pixels)), red


@pytest.mark.parametrize("photo", SKIMAGE_PHOTOS)
@pytest.mark.parametrize("max_side", [512, None, 64])
def test_photos_hash_as_pdqhash_hashes_them(photo: str, max_side: int | None) -> None:
    image = skimage_photo(photo)
    plain, variants = _reference(image, max_side)
    assert pdq_hash(image, max_side=max_side) == plain
    assert pdq_hash_dihedral(image, max_side=max_side) == variants


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (4, 9), (5, 5), (64, 64), (65, 7), (333, 500), (700, 90)]
)
def test_odd_sizes_hash_as_pdqhash_hashes_them(width: int, height: int) -> None:
    image = _noise(width, height, seed=width * 1000 + height)
    plain, variants = _reference(image, 512)
    assert pdq_hash(image) == plain
    assert pdq_hash_dihedral(image) == variants


def test_fallback_to_pdqhash_entry_points_gives_the_same_hashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = skimage_photo("coffee")
    direct = (pdq_hash(image), pdq_hash_dihedral(image))
    monkeypatch.setattr(pdq, "native_pdq", lambda: None)
    assert (pdq_hash(image), pdq_hash_dihedral(image)) == direct


def test_threads_hash_concurrently_without_mixing_results() -> None:
    images = [_noise(300, 200, seed) for seed in range(8)]
    expected = [pdq_hash_dihedral(image) for image in images]
    results: dict[int, list[tuple[PdqHash, ...]]] = {}

    def work(index: int) -> None:
        results[index] = [pdq_hash_dihedral(image) for image in images for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got in results.values():
        assert got == [e for e in expected for _ in range(3)]


def test_luma_must_be_writable_contiguous_float32() -> None:
    native = native_pdq()
    if native is None:
        pytest.skip("pdqhash's C++ functions are not callable directly here")
    luma = np.zeros((10, 10), dtype=np.float32)
    luma.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        native.plain(luma)
    with pytest.raises(ValueError, match="float32"):
        native.plain(np.zeros((10, 10), dtype=np.float64))
    with pytest.raises(ValueError, match="float32"):
        native.dihedral(np.zeros((10, 20), dtype=np.float32)[:, ::2])
