"""Region descriptors for free: the encoder's last feature map GeM-pooled over sub-windows.

The default encoder's embedding is the GeM (p=3) pool of its final ``forward_features`` map,
float32 (1280, 7, 7) for a 224 px input (:mod:`.timm_backend`): one cell per 32 px. Pooling the
same map over windows of cells instead of the whole grid gives one descriptor per window at the
cost of a few numpy sums: no more network passes. A photo pasted onto another photo, or shown
inside a screenshot, fills a few cells.

Such a window is not close to the pasted photo's *global* embedding, though: the network saw
the photo at 96 px, not at 224, and its features are not scale-invariant (measured on
photos-dev, 60 entries: a pasted photo's best window scored median 0.42-0.51 against its entry's
global vector, no better than the whole image's embedding). It is close to the entry seen the
same way: :func:`paste_canvas` puts the entry at 3 x 3 cells in the middle of a grey canvas,
and the same window of that canvas's map (:data:`PASTE_CELLS`) is the entry's *paste
descriptor* (:mod:`moderation.banks.paste_rows`), stored at import. Query windows are every
3 x 3 window of the map (:data:`WINDOW_CELLS`, 25); README "Feature-map windows" has the
layouts tried.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.signals.encoders.lite0 import GEM_EPS, GEM_P

if GEM_P != 3.0:  # pragma: no cover - the pooling below is written for p = 3
    raise ImportError(f"feature windows assume GeM p = 3, not {GEM_P}")

Cells = tuple[int, int, int]
"""A square window of the feature map: (top row, left column, side), in cells."""


def grid(side: int, stride: int, cells: int = 7) -> tuple[Cells, ...]:
    """Every ``side`` x ``side`` window of a ``cells`` x ``cells`` map at ``stride``, the last
    row and column of windows flush with the map's edge, row by row.

    Raises:
        ValueError: ``side`` is not in [1, cells] or ``stride`` < 1.
    """
    if not 1 <= side <= cells or stride < 1:
        raise ValueError(f"bad window grid: side {side}, stride {stride} on {cells} cells")
    starts = sorted({*range(0, cells - side + 1, stride), cells - side})
    return tuple((top, left, side) for top in starts for left in starts)


PASTE_SIDE: Final = 3
"""Side, in cells, of the query windows and of the entry in its paste canvas (96 px of 224)."""
WINDOW_CELLS: Final[tuple[Cells, ...]] = grid(PASTE_SIDE, 1)
"""The windows pooled per query image: every 3 x 3 window of the 7 x 7 map (25)."""
PASTE_CELLS: Final[tuple[Cells, ...]] = ((2, 2, PASTE_SIDE),)
"""The window of a :func:`paste_canvas` that holds the entry (its middle 3 x 3 cells)."""
CANVAS_GREY: Final = (128, 128, 128)
"""Fill of the paste canvas: mid grey, 0 after the encoder's ``(x - 127) / 128`` scaling."""


def paste_canvas(image: Image.Image, size: int = 224, cells: int = 7) -> Image.Image:
    """``image`` resized (bicubic) to :data:`PASTE_SIDE` of the ``cells`` cells of a ``size``
    px square grey canvas and placed on the cells of :data:`PASTE_CELLS`: an RGB image
    (``size``, ``size``), from which the entry's paste descriptor is pooled."""
    cell = size / cells
    top, left, side = PASTE_CELLS[0]
    canvas = Image.new("RGB", (size, size), CANVAS_GREY)
    inner = round(side * cell)
    canvas.paste(
        image.convert("RGB").resize((inner, inner), Image.Resampling.BICUBIC),
        (round(left * cell), round(top * cell)),
    )
    return canvas


def _cube(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``x ** GEM_P`` for p = 3 as two multiplications (``**`` calls ``pow`` per element, about
    ten times slower)."""
    out: npt.NDArray[np.float32] = x * x
    out *= x
    return out


def _box_sums(cubed: npt.NDArray[np.float32], side: int) -> npt.NDArray[np.float32]:
    """Sums of every ``side`` x ``side`` box of (n, h, w, c) ``cubed``: (n, h - side + 1,
    w - side + 1, c)."""
    h, w = cubed.shape[1], cubed.shape[2]
    tall = cubed[:, : h - side + 1].copy()
    for dy in range(1, side):
        tall += cubed[:, dy : dy + h - side + 1]
    out = tall[:, :, : w - side + 1].copy()
    for dx in range(1, side):
        out += tall[:, :, dx : dx + w - side + 1]
    return out


def pool_windows(
    feature_map: npt.ArrayLike, windows: tuple[Cells, ...] = WINDOW_CELLS
) -> npt.NDArray[np.float32]:
    """GeM (p = :data:`.lite0.GEM_P`, clamped at :data:`.lite0.GEM_EPS`, as the global pooling)
    of each window of each map, L2-normalised: float32 (n, len(windows), c) unit rows for
    ``feature_map`` float (n, c, h, w).

    Per window side, the cubed map (channels last) is box-summed by two separable sliding
    sums, and each window of that side picks its sum: about 0.2 ms of CPU per image for the 25
    default windows (a float64 summed-area table took 1.4 ms).

    Raises:
        ValueError: ``feature_map`` is not 4-D, ``windows`` is empty or a window is not
            inside the map.
    """
    maps = np.asarray(feature_map, dtype=np.float32)
    if maps.ndim != 4 or not windows:
        raise ValueError(f"expected (n, c, h, w) maps and windows, got {maps.shape}")
    n, c, h, w = maps.shape
    if any(t < 0 or x < 0 or k < 1 or t + k > h or x + k > w for t, x, k in windows):
        raise ValueError(f"a window of {windows} is not inside the {h} x {w} map")
    cubed = _cube(np.maximum(maps.transpose(0, 2, 3, 1), np.float32(GEM_EPS)))
    pooled = np.empty((n, len(windows), c), np.float32)
    for side in {k for _, _, k in windows}:
        means = _box_sums(cubed, side) / np.float32(side * side)
        for at, (top, left, k) in enumerate(windows):
            if k == side:
                pooled[:, at] = means[:, top, left]
    pooled = np.cbrt(np.maximum(pooled, np.float32(0.0)))
    norms = np.linalg.norm(pooled, axis=2, keepdims=True)
    return np.ascontiguousarray(pooled / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def pool_global(feature_map: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """GeM of the whole map, float32 (n, c), not normalised: the encoder's raw features
    (the window over all cells; used to check a model's map output against its features)."""
    maps = np.asarray(feature_map, dtype=np.float32)
    cubed = _cube(np.maximum(maps, np.float32(GEM_EPS)))
    pooled: npt.NDArray[np.float32] = np.cbrt(cubed.mean(axis=(2, 3)))
    return pooled
