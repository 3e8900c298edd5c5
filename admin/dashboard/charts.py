"""Stacked bar charts as inline SVG geometry (no chart library, no script: CSP-safe).

The template draws one ``<rect>`` per segment with a CSS class per series, so colours live in
the stylesheet and no ``style`` attribute is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moderation.governance.dashboard import HourBucket

WIDTH = 720
HEIGHT = 180
MARGIN_LEFT = 40
MARGIN_BOTTOM = 20
MARGIN_TOP = 10


@dataclass(frozen=True)
class Segment:
    """One rectangle: position and size (SVG user units), series and tooltip."""

    x: float
    y: float
    width: float
    height: float
    series: str
    title: str


@dataclass(frozen=True)
class Chart:
    """An SVG chart: segments, y-axis maximum, x labels every few bars."""

    width: int
    height: int
    segments: list[Segment]
    y_max: int
    x_labels: list[tuple[float, str]]
    series: tuple[str, ...]
    plot_top: float
    plot_bottom: float
    plot_left: float


def stacked_bars(buckets: Sequence[HourBucket], series: Sequence[str]) -> Chart:
    """One stacked bar per hour bucket, series in the given order from the bottom."""
    plot_w = WIDTH - MARGIN_LEFT
    plot_h = HEIGHT - MARGIN_BOTTOM - MARGIN_TOP
    y_max = max([b.total for b in buckets] + [1])
    slot = plot_w / max(1, len(buckets))
    bar_w = max(1.0, slot * 0.8)
    segments: list[Segment] = []
    labels: list[tuple[float, str]] = []
    for i, bucket in enumerate(buckets):
        x = MARGIN_LEFT + i * slot + (slot - bar_w) / 2
        base = float(HEIGHT - MARGIN_BOTTOM)
        for name in series:
            count = bucket.counts.get(name, 0)
            if not count:
                continue
            h = plot_h * count / y_max
            base -= h
            segments.append(
                Segment(
                    round(x, 2),
                    round(base, 2),
                    round(bar_w, 2),
                    round(h, 2),
                    name,
                    f"{bucket.start:%H:00} UTC: {count} {name}",
                )
            )
        if i % 4 == 0:
            labels.append((round(x + bar_w / 2, 2), f"{bucket.start:%H:00}"))
    return Chart(
        WIDTH,
        HEIGHT,
        segments,
        y_max,
        labels,
        tuple(series),
        MARGIN_TOP,
        HEIGHT - MARGIN_BOTTOM,
        MARGIN_LEFT,
    )
