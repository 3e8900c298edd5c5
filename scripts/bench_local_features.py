"""Compare ways to find a bank photo pasted onto another photo (issue 15): feature-map windows
against paste descriptors (what screening does today) and local features
(:mod:`moderation.signals.local_features`: SIFT, ratio test, RANSAC inliers).

Usage (from the repository root)::

    PYTHONPATH=$PWD python scripts/bench_local_features.py PHOTO_DIR [N] [IMPLEMENTATION ...]

``N`` (default 60) photos of the shuffled folder are the entries, the next ``N`` the
backgrounds and the next ``N`` the unrelated negatives; every entry is pasted twice by each
implementation (default: the tuning ones, ``paste.anywhere`` and ``paste.polaroid``). Prints,
per method, the share of pastes whose score to their own entry is above every negative's best
score to any entry (and per implementation), the median own score, the negatives' highest
score, and the CPU ms per query. Not a pytest: a measurement tool, run by hand.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.config import Settings
from moderation.media.implementations import apply_implementation
from moderation.signals import local_features as lf
from moderation.signals.encoders import create_encoder
from moderation.signals.encoders.feature_windows import pool_windows

Scores = Callable[[Sequence[Image.Image]], npt.NDArray[np.float64]]


def window_scores(entries: Sequence[Image.Image]) -> Scores:
    """Best feature-map window to paste descriptor, per (query, entry): today's signal."""
    encoder = create_encoder(Settings().encoder)
    pastes = encoder.encode_paste_descriptors(entries)

    def score(queries: Sequence[Image.Image]) -> npt.NDArray[np.float64]:
        _, maps = encoder._embed_maps(encoder.preprocess(queries), 16)
        windows = pool_windows(maps)  # (q, 25, d)
        return np.einsum("qwd,ed->qwe", windows, pastes).max(axis=1).astype(np.float64)

    return score


def local_scores(entries: Sequence[Image.Image]) -> Scores:
    """RANSAC inliers of the verified entries per (query, entry), 0 when not verified."""
    index = lf.LocalIndex(
        {i: lf.extract(e, lf.ENTRY_SIDE, lf.ENTRY_KEYPOINTS) for i, e in enumerate(entries)}
    )

    def score(queries: Sequence[Image.Image]) -> npt.NDArray[np.float64]:
        out = np.zeros((len(queries), len(entries)))
        for row, query in enumerate(queries):
            found = index.verify(lf.extract_query(query))
            for entry, inliers in found.items():
                out[row, entry] = inliers
        return out

    return score


def main(argv: list[str]) -> None:
    """Paste, score and print (arguments: see the module docstring)."""
    folder = Path(argv[0])
    n = int(argv[1]) if len(argv) > 1 else 60
    implementations = argv[2:] or ["paste.anywhere", "paste.polaroid"]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    random.Random(1).shuffle(files)  # noqa: S311 (a reproducible split, not a secret)
    photos = [Image.open(p).convert("RGB") for p in files[: 3 * n]]
    entries, backgrounds, negatives = photos[:n], photos[n : 2 * n], photos[2 * n :]
    pastes, owners, kinds = [], [], []
    for name in implementations:
        for i, entry in enumerate(entries):
            for seed in (0, 1):
                back = backgrounds[(i + 7 * seed) % n]
                pastes.append(
                    apply_implementation(name, entry, seed=1000 + seed + 7 * i, background=back)
                )
                owners.append(i)
                kinds.append(name)
    for method, build in (("feature windows", window_scores), ("local features", local_scores)):
        score = build(entries)
        start = time.process_time()
        own_all = score(pastes)
        ms = (time.process_time() - start) * 1000 / len(pastes)
        negative_best = score(negatives).max(axis=1)
        own = own_all[np.arange(len(pastes)), owners]
        line = f"{method}: above every negative {np.mean(own > negative_best.max()):.2f}"
        for name in implementations:
            mine = own[[k == name for k in kinds]]
            line += f", {name} {np.mean(mine > negative_best.max()):.2f}"
        print(
            f"{line}; own median {np.median(own):.3f}; negatives' max {negative_best.max():.3f}"
            f" (98th pct {np.quantile(negative_best, 0.98):.3f}); {ms:.1f} CPU ms per query"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
