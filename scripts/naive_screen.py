#!/usr/bin/env python
"""The naive screening baseline of issue 7: what a first script would do.

Decode with Pillow (full size, ``convert("RGB")``), embed with eager PyTorch EfficientNet-Lite0
at batch 32 (timm, the packaged weights, torchvision transforms: the same model, weights,
preprocessing and GeM pooling as ``moderation``'s default encoder, so the embeddings agree),
and search the bank by exact cosine similarity (one numpy matrix product). No PDQ, no
database, no encryption. Decides ``block``/``review``/``allow`` with the default policy's
cosine thresholds (``policies/default.yaml``: 0.78 and 0.70).

    python scripts/naive_screen.py embed-bank BANK.npy IMAGE...   # once, untimed
    python scripts/naive_screen.py screen BANK.npy IMAGE...        # one JSON line per image

``scripts/bench_screen_vs_naive.sh`` times ``screen`` against ``moderation screen``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms

from moderation.signals.encoders.timm_backend import (
    GEM_EPS,
    GEM_P,
    INPUT_MEAN,
    INPUT_SIZE,
    INPUT_STD,
    TIMM_ARCH,
    TIMM_KWARGS,
    map_state_dict_by_position,
    packaged_weights_path,
)

BATCH = 32
BLOCK_COSINE = 0.78
REVIEW_COSINE = 0.70


class NaiveScreener:
    """Eager EfficientNet-Lite0 embeddings and exact cosine search over ``bank`` images (or a
    saved ``.npy`` matrix of their embeddings)."""

    def __init__(self, bank: Sequence[Path] | Path) -> None:
        model = timm.create_model(TIMM_ARCH, pretrained=False, **TIMM_KWARGS)
        source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_position(source, model.state_dict()))
        self.model = model.eval()
        bicubic = transforms.InterpolationMode.BICUBIC
        self.transform = transforms.Compose(
            [
                transforms.Resize((INPUT_SIZE, INPUT_SIZE), interpolation=bicubic),
                transforms.ToTensor(),
                transforms.Normalize(INPUT_MEAN, INPUT_STD),
            ]
        )
        if isinstance(bank, Path):
            self.bank = np.load(bank)
        else:
            self.bank = self.embed(list(bank))

    def embed(self, paths: Sequence[Path]) -> np.ndarray:
        """Unit embeddings (n, 1280) float32 of the images at ``paths``."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(paths), BATCH):
                images = [Image.open(p).convert("RGB") for p in paths[start : start + BATCH]]
                batch = torch.stack([self.transform(image) for image in images])
                features = self.model.forward_features(batch)
                pooled = features.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1 / GEM_P)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)

    def screen(self, paths: Sequence[Path]) -> list[dict[str, object]]:
        """One ``{"path", "decision", "score", "entry"}`` per image."""
        vectors = self.embed(list(paths))
        scores = vectors @ self.bank.T
        rows = []
        for path, row in zip(paths, scores, strict=True):
            best = int(np.argmax(row))
            score = float(row[best])
            decision = (
                "block"
                if score >= BLOCK_COSINE
                else "review"
                if score >= REVIEW_COSINE
                else "allow"
            )
            rows.append(
                {"path": str(path), "decision": decision, "score": round(score, 4), "entry": best}
            )
        return rows


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[0] not in {"embed-bank", "screen"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, target, images = argv[0], Path(argv[1]), [Path(p) for p in argv[2:]]
    if command == "embed-bank":
        np.save(target, NaiveScreener(images).bank)
        return 0
    for row in NaiveScreener(target).screen(images):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
