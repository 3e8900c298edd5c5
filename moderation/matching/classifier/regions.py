"""Region signals of the classifier stage: entry windows at import, bounded query views.

A global embedding describes the whole picture, so it misses a crop of a banned photo (the query
is part of the entry) and a banned photo pasted into a screenshot, a meme or onto another photo
(the entry is part of the query). Two kinds of regions close those gaps:

* **Entry windows** (:data:`ENTRY_WINDOWS`), embedded once at bank import: the four corners and
  the centre, each 60% of each side (overlapping quadrants, as the multi-crop views of
  Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy Detection", arXiv:2202.10261).
  They are stored encrypted beside the global vector in the snapshot.
* **Query views** (:func:`query_views`), computed only for queries in the uncertain band and at
  most ``max_views`` of them: rectangles found by a cheap paste/border detector
  (:func:`find_pasted_rectangles`: long straight axis-aligned edges, as a pasted photo leaves on a
  canvas or a UI screenshot) and, for mosaic-pixelised queries (:func:`mosaic_block`), the mosaic
  undone by resampling. Detection is numpy on a <= 256 px grey copy (well under a millisecond of
  encoder time), so the only real cost is one embedding per view found.
* **Query windows** (:func:`window_boxes`, :func:`query_windows`): a fixed grid of overlapping
  multi-scale windows (:data:`WINDOW_GRID`), embedded in one batch only for queries in the
  narrower window band (:class:`~moderation.matching.classifier.stage.WindowBand`). Unlike the
  detector they need no straight edge: a photo pasted with a feathered or elliptic mask, or a
  screenshot whose chrome blends into the photo, still fills most of one window (the regional
  descriptors of Tolias, Sicre and Jégou 2016, "Particular object retrieval with integral
  max-pooling of CNN activations", computed here by cropping and embedding each window).
* **Paste descriptors** (:func:`make_region_embedder` with ``paste``): one more region row per
  entry, the entry seen pasted small, which the query's feature-map windows are searched
  against (:mod:`moderation.banks.paste_rows`); those windows need no extra model pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.signals.local_features import grey_thumbnail

if TYPE_CHECKING:
    from moderation.signals.encoders import Encoder

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) as fractions of the width and height."""

ENTRY_WINDOW_SIDE = 0.6
"""Side of an entry window as a fraction of the entry's side (overlapping quadrants)."""

ENTRY_WINDOWS: tuple[tuple[str, Box], ...] = (
    ("top_left", (0.0, 0.0, 0.6, 0.6)),
    ("top_right", (0.4, 0.0, 1.0, 0.6)),
    ("bottom_left", (0.0, 0.4, 0.6, 1.0)),
    ("bottom_right", (0.4, 0.4, 1.0, 1.0)),
    ("centre", (0.2, 0.2, 0.8, 0.8)),
)
"""The entry windows embedded at import, in the order their vectors are stored."""

DETECT_SIDE = 256
"""Longest side (px) of the grey copy the detectors work on."""
EDGE_THRESHOLD = 12.0
"""Grey-level step (0-255) that counts as an edge pixel."""
LINE_PEAK = 1.5
"""An edge pixel is on a line when it is this many times stronger than 2 px to either side."""
MIN_SIDE_SCORE = 0.6
"""Mean share of line pixels along a rectangle's inner sides for it to count as a paste."""
MIN_AREA, MAX_AREA = 0.12, 0.85
"""Area of a detected rectangle as a share of the query's (smaller: too little to embed;
larger: the view would add nothing over the global embedding)."""
LINE_CANDIDATES = 6
"""Rows and columns kept as candidate rectangle sides (plus the image borders)."""
MOSAIC_GRID_SHARE = 0.6
"""Share of columns (and of rows) that must be flat, i.e. hold almost no grey-level step to the
next one, for a query to count as mosaic-pixelised: a nearest-neighbour upscaled mosaic changes
only on its block grid, while blur and flat areas spread their small steps over every column."""


WINDOW_GRID: tuple[tuple[float, int], ...] = ((1 / 3, 3), (0.5, 2))
"""Query windows as (side, positions per axis): side is a fraction of the query's width and
height, positions spread evenly from one border to the other (overlapping where ``side *
positions > 1``). The 3 x 3 third-windows hold a photo pasted at 20-40% of the side; the
2 x 2 half-windows one at 40-60%. Chosen on photos-dev (60 bank photos pasted at 30% of the
side with a feathered ellipse mask onto other photos, 60 unrelated photos; EfficientNet-Lite0):
best window cosine to the pasted photo median 0.67 for 3 x 3 thirds against 0.52 for 2 x 2
halves and 0.38 for the global embedding, the unrelated photos' best window to any of the 60 at
most 0.61 (README "Query windows")."""
WINDOW_CENTRE = (0.25, 0.25, 0.75, 0.75)
"""The centre half-window, added to the grid (a paste is most often near the centre)."""


def window_boxes(grid: Sequence[tuple[float, int]] = WINDOW_GRID) -> list[Box]:
    """The query windows of ``grid`` (see :data:`WINDOW_GRID`) plus :data:`WINDOW_CENTRE`, row
    by row per scale, as (left, top, right, bottom) fractions inside [0, 1].

    Raises:
        ValueError: a side is not in (0, 1] or a position count is below 1.
    """
    boxes: list[Box] = []
    for side, count in grid:
        if not 0.0 < side <= 1.0 or count < 1:
            raise ValueError(f"bad window grid entry ({side}, {count})")
        starts = [0.0] if count == 1 else [i * (1.0 - side) / (count - 1) for i in range(count)]
        boxes.extend((x, y, x + side, y + side) for y in starts for x in starts)
    if WINDOW_CENTRE not in boxes:
        boxes.append(WINDOW_CENTRE)
    return boxes


def query_windows(image: Image.Image) -> list[Image.Image]:
    """The crops of :func:`window_boxes` of an RGB query frame, in order."""
    return [crop(image, box) for box in window_boxes()]


def crop(image: Image.Image, box: Box) -> Image.Image:
    """``image`` cropped to ``box`` (fractions), at least 1 x 1 px."""
    w, h = image.size
    left, top = round(box[0] * w), round(box[1] * h)
    right = max(left + 1, round(box[2] * w))
    bottom = max(top + 1, round(box[3] * h))
    return image.crop((left, top, right, bottom))


def entry_windows(image: Image.Image) -> list[Image.Image]:
    """The :data:`ENTRY_WINDOWS` crops of an RGB image, in order."""
    return [crop(image, box) for _, box in ENTRY_WINDOWS]


def make_region_embedder(
    encoder: Encoder,
    batch_size: int = 32,
    *,
    paste: bool = False,
    local: bool = False,
    keypoint_budget: int | None = None,
) -> Callable[[Sequence[Image.Image]], list[npt.NDArray[np.float32]]]:
    """A :data:`moderation.banks.importer.RegionEmbedder`: images -> float32 (5, d) each,
    the unit-norm embeddings of their :data:`ENTRY_WINDOWS`; with ``paste`` (and an encoder
    with feature-map windows) (6, d): the entry's paste descriptor after them
    (:mod:`moderation.banks.paste_rows`, one more model pass per image); with ``local`` too,
    the entry's SIFT keypoints packed after that (:func:`.local_features.pack`, 14 rows of
    1280 for :data:`.local_features.ENTRY_KEYPOINTS`), for the first ``keypoint_budget``
    images it embeds (None: all; :func:`moderation.banks.keypoint_rows.keypoint_budget`)."""
    with_paste = paste and encoder.has_feature_windows
    if with_paste and local and (keypoint_budget is None or keypoint_budget > 0):
        return _with_keypoints(
            make_region_embedder(encoder, batch_size, paste=True), encoder.dim, keypoint_budget
        )

    def embed(images: Sequence[Image.Image]) -> list[npt.NDArray[np.float32]]:
        crops = [c for image in images for c in entry_windows(image)]
        if not crops:
            return []
        vectors = encoder.encode(crops, batch_size=batch_size)
        per = len(ENTRY_WINDOWS)
        windows = [vectors[i * per : (i + 1) * per] for i in range(len(images))]
        if not with_paste:
            return windows
        pastes = encoder.encode_paste_descriptors(images, batch_size=batch_size)
        return [np.concatenate([w, p[None]]) for w, p in zip(windows, pastes, strict=True)]

    return embed


def _with_keypoints(
    embed: Callable[[Sequence[Image.Image]], list[npt.NDArray[np.float32]]],
    dim: int,
    budget: int | None,
) -> Callable[[Sequence[Image.Image]], list[npt.NDArray[np.float32]]]:
    """``embed``'s rows of each image followed by its packed keypoints, for the first
    ``budget`` images over all calls (None: every image)."""
    from moderation.signals import local_features as lf

    left = math.inf if budget is None else budget

    def with_keypoints(images: Sequence[Image.Image]) -> list[npt.NDArray[np.float32]]:
        nonlocal left
        out = []
        for r, image in zip(embed(images), images, strict=True):
            if left > 0:
                left -= 1
                keypoints = lf.extract(image, lf.ENTRY_SIDE, lf.ENTRY_KEYPOINTS)
                r = np.concatenate([r, lf.pack(keypoints, dim)])
            out.append(r)
        return out

    return with_keypoints


def _line_map(steps: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Line pixels of an edge-strength map along axis 0: strong, and a local peak across it
    (texture is strong everywhere; a paste boundary only on its line). A boundary blurred over
    two rows counts on both."""
    padded = np.pad(steps, ((2, 2), (0, 0)))
    neighbours = np.maximum(padded[:-4], padded[4:])
    lines = (steps > EDGE_THRESHOLD) & (steps >= LINE_PEAK * neighbours)
    lines[:-1] |= lines[1:]
    return lines


def _top_lines(lines: npt.NDArray[np.bool_], count: int) -> list[int]:
    """Indices (along axis 0) of the ``count`` strongest lines, 3 apart at least."""
    strength = lines.mean(axis=1)
    chosen: list[int] = []
    for index in np.argsort(-strength, kind="stable"):
        if strength[index] <= 0.0 or len(chosen) >= count:
            break
        if all(abs(int(index) - c) > 3 for c in chosen):
            chosen.append(int(index))
    return chosen


@dataclass(frozen=True)
class Detection:
    """A rectangle found by :func:`find_pasted_rectangles`: its mean inner-side score and how
    many of its sides lie inside the image (2-4)."""

    box: Box
    score: float
    sides: int = 4


def find_pasted_rectangles(image: Image.Image, max_count: int = 2) -> list[Detection]:
    """Axis-aligned rectangles bounded by long straight edges: a photo pasted onto a canvas, a
    UI screenshot or another photo (best first, at most ``max_count``, overlapping ones dropped).

    Method: on a grey copy (longest side :data:`DETECT_SIDE`), line pixels are edge steps above
    :data:`EDGE_THRESHOLD` that peak across the line (:data:`LINE_PEAK`); the
    :data:`LINE_CANDIDATES` rows and columns richest in them, plus the image borders, are
    candidate sides; every rectangle of candidate sides with :data:`MIN_AREA` to
    :data:`MAX_AREA` of the area and at least two sides inside the image is scored by the share
    of line pixels along its inner sides (prefix sums: O(1) per side). Rectangles scoring at
    least :data:`MIN_SIDE_SCORE` are returned, most summed side score first. A heuristic
    border/paste detector in the spirit of the design card's "cheap saliency or border-removal
    step", not a learned one.
    """
    grey = grey_thumbnail(image, DETECT_SIDE).astype(np.float32)
    h, w = grey.shape
    if h < 16 or w < 16:
        return []
    rows = _line_map(np.abs(np.diff(grey, axis=0)))  # (h-1, w): boundary below row y
    cols = _line_map(np.abs(np.diff(grey, axis=1)).T)  # (w-1, h): boundary right of column x
    row_sums = np.concatenate([np.zeros((rows.shape[0], 1)), np.cumsum(rows, axis=1)], axis=1)
    col_sums = np.concatenate([np.zeros((cols.shape[0], 1)), np.cumsum(cols, axis=1)], axis=1)
    ys = sorted({0, h, *(y + 1 for y in _top_lines(rows, LINE_CANDIDATES))})
    xs = sorted({0, w, *(x + 1 for x in _top_lines(cols, LINE_CANDIDATES))})
    top, bottom, left, right = _candidate_rectangles(ys, xs, h, w)
    score, sides = _side_scores(row_sums, col_sums, (top, bottom, left, right), h, w)
    good = (sides >= 2) & (score >= MIN_SIDE_SCORE)
    found = [
        Detection((int(lx) / w, int(ty) / h, int(rx) / w, int(by) / h), float(sc), int(n))
        for ty, by, lx, rx, sc, n in zip(
            top[good], bottom[good], left[good], right[good], score[good], sides[good], strict=True
        )
    ]
    # Most evidence first: the summed side scores, so a rectangle closed on all four sides
    # beats a corner made of two of its sides and the image border.
    found.sort(key=lambda d: -d.score * d.sides)
    chosen: list[Detection] = []
    for det in found:
        if all(_iou(det.box, c.box) < 0.5 for c in chosen):
            chosen.append(det)
        if len(chosen) >= max_count:
            break
    return chosen


_Sides = tuple[npt.NDArray[np.int64], ...]  # top, bottom, left, right: px, one per rectangle


def _candidate_rectangles(ys: list[int], xs: list[int], h: int, w: int) -> _Sides:
    """Every rectangle of candidate sides with MIN_AREA to MAX_AREA of the image, at once, in
    (top, bottom, left, right) loop order."""
    yi, yj = np.triu_indices(len(ys), k=1)
    xi, xj = np.triu_indices(len(xs), k=1)
    tops, bottoms = np.asarray(ys)[yi], np.asarray(ys)[yj]
    lefts, rights = np.asarray(xs)[xi], np.asarray(xs)[xj]
    top = np.repeat(tops, lefts.size)
    bottom = np.repeat(bottoms, lefts.size)
    left = np.tile(lefts, tops.size)
    right = np.tile(rights, tops.size)
    area = (bottom - top) * (right - left) / (h * w)
    keep = (area >= MIN_AREA) & (area <= MAX_AREA)
    return top[keep], bottom[keep], left[keep], right[keep]


def _side_scores(
    row_sums: npt.NDArray[np.float64],
    col_sums: npt.NDArray[np.float64],
    rectangles: _Sides,
    h: int,
    w: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(mean inner-side score, inner sides) of each rectangle, from the line maps' prefix sums.

    A side's score is its share of line pixels (0 where the side is the border); they are
    summed in the order top, bottom, left, right, as a sequential mean of the inside ones.
    """
    top, bottom, left, right = rectangles
    total = np.zeros(top.size)
    sides = np.zeros(top.size, dtype=np.int64)
    for y, inside in ((top, top > 0), (bottom, bottom < h)):
        row = np.clip(y - 1, 0, h - 2)  # border sides: any row, masked out below
        share = (row_sums[row, right] - row_sums[row, left]) / (right - left)
        total = total + np.where(inside, share, 0.0)
        sides += inside
    for x, inside in ((left, left > 0), (right, right < w)):
        col = np.clip(x - 1, 0, w - 2)
        share = (col_sums[col, bottom] - col_sums[col, top]) / (bottom - top)
        total = total + np.where(inside, share, 0.0)
        sides += inside
    with np.errstate(invalid="ignore", divide="ignore"):
        score = total / sides
    return score, sides


def _iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mosaic_block(image: Image.Image) -> int | None:
    """The block size (px) of a mosaic-pixelised image, or None when it does not look like one.

    A pair of neighbouring pixels (full-resolution grey) "steps" when they differ by more than 2
    levels. In a mosaic, steps happen only on the block grid: at least
    :data:`MOSAIC_GRID_SHARE` of the columns (and of the rows) step in fewer than 5% of their
    pixels. The block size is the number of columns over the number of stepping columns.
    """
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    if grey.shape[0] < 16 or grey.shape[1] < 16:
        return None
    col_steps = (np.abs(np.diff(grey, axis=1)) > 2).mean(axis=0)
    row_steps = (np.abs(np.diff(grey, axis=0)) > 2).mean(axis=1)
    if min(float((col_steps < 0.05).mean()), float((row_steps < 0.05).mean())) < MOSAIC_GRID_SHARE:
        return None
    stepping = int((col_steps >= 0.3).sum())
    if stepping < 2:
        return None  # a flat image, not a mosaic
    block = round(len(col_steps) / stepping)
    return block if block >= 3 else None


def demosaic(image: Image.Image, block: int) -> Image.Image:
    """Undo a mosaic of ``block`` px: box-downscale to one pixel per block, bicubic back up."""
    small = (max(1, round(image.width / block)), max(1, round(image.height / block)))
    reduced = image.resize(small, Image.Resampling.BOX)
    return reduced.resize(image.size, Image.Resampling.BICUBIC)


PASTE_CANDIDATES = 4
"""Rectangles a ``rank`` function may choose from (:func:`query_views`)."""


def query_views(
    image: Image.Image,
    max_views: int = 1,
    rank: Callable[[list[Image.Image]], list[float]] | None = None,
) -> list[tuple[str, Image.Image]]:
    """At most ``max_views`` extra views of a query frame worth embedding, named ``demosaic``
    (a mosaic undone) or ``pasted`` (a detected rectangle's crop); empty when nothing is found.

    A mosaic's block grid is full of straight edges, so a mosaic query gets no paste detection.
    Without ``rank`` the detector's best rectangles are taken; with it, the best
    :data:`PASTE_CANDIDATES` are cropped and ``rank`` orders them (lower first): the classifier
    stage ranks by the PDQ distance of each crop to the nearest bank entry, which costs a hash
    per crop instead of an embedding.
    """
    block = mosaic_block(image)
    if block is not None:
        return [("demosaic", demosaic(image, block))][:max_views]
    count = PASTE_CANDIDATES if rank is not None else max_views
    crops = [crop(image, det.box) for det in find_pasted_rectangles(image, max_count=count)]
    if rank is not None and len(crops) > 1:
        costs = rank(crops)
        crops = [crops[i] for i in sorted(range(len(crops)), key=lambda i: (costs[i], i))]
    return [("pasted", c) for c in crops[:max_views]]
