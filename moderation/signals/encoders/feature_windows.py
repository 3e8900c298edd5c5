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


def pool_windows(
    feature_map: npt.ArrayLike, windows: tuple[Cells, ...] = WINDOW_CELLS
) -> npt.NDArray[np.float32]:
    """GeM (p = :data:`.lite0.GEM_P`, clamped at :data:`.lite0.GEM_EPS`, as the global pooling)
    of each window of each map, L2-normalised: float32 (n, len(windows), c) unit rows for
    ``feature_map`` float (n, c, h, w). Window cells beyond the map are clipped to it.

    Uses a summed-area table of the cubed map, so every window costs one four-corner sum.

    Raises:
        ValueError: ``feature_map`` is not 4-D or ``windows`` is empty.
    """
    maps = np.asarray(feature_map, dtype=np.float32)
    if maps.ndim != 4 or not windows:
        raise ValueError(f"expected (n, c, h, w) maps and windows, got {maps.shape}")
    cubed = np.maximum(maps, np.float32(GEM_EPS)) ** np.float32(GEM_P)
    n, c, h, w = maps.shape
    table = np.zeros((n, c, h + 1, w + 1), np.float64)
    table[:, :, 1:, 1:] = cubed.cumsum(axis=2, dtype=np.float64).cumsum(axis=3)
    pooled = np.empty((n, len(windows), c), np.float32)
    for k, (top, left, side) in enumerate(windows):
        bottom, right = min(h, top + side), min(w, left + side)
        total = (
            table[:, :, bottom, right]
            - table[:, :, top, right]
            - table[:, :, bottom, left]
            + table[:, :, top, left]
        )
        pooled[:, k] = total / ((bottom - top) * (right - left))
    pooled = np.maximum(pooled, np.float32(0.0)) ** np.float32(1.0 / GEM_P)
    norms = np.linalg.norm(pooled, axis=2, keepdims=True)
    return np.ascontiguousarray(pooled / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def pool_global(feature_map: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """GeM of the whole map, float32 (n, c), not normalised: the encoder's raw features
    (the window over all cells; used to check a model's map output against its features)."""
    maps = np.asarray(feature_map, dtype=np.float32)
    cubed = np.maximum(maps, np.float32(GEM_EPS)) ** np.float32(GEM_P)
    pooled: npt.NDArray[np.float32] = cubed.mean(axis=(2, 3)) ** np.float32(1.0 / GEM_P)
    return pooled
