"""A second offline encoder for the encoder-migration tests: a tiny open_clip model (random
weights, seeded) saved as a local checkpoint, registered in this process and, through a
``sitecustomize.py`` to put on ``PYTHONPATH``, in the service processes the tests start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_ARCH = "moderation-test-migration-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Register the tiny architecture in this process until the test ends (config written to
    ``directory``); returns the config's path. A later test of a deployment made by
    :func:`tiny_clip_encoder` calls this again to open its encoder."""
    import open_clip
    import open_clip.factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS)
    )
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    return config


def tiny_clip_encoder(directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write the config, a seeded checkpoint and ``directory/sitecustomize.py``; register the
    architecture in this process (undone after the test); return the encoder name."""
    import open_clip
    import torch

    config = register_tiny_clip(directory, monkeypatch)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    checkpoint = directory / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    (directory / "sitecustomize.py").write_text(
        f"import open_clip\nopen_clip.add_model_config({str(config)!r})\n"
    )
    return f"open_clip/{TINY_ARCH}/{checkpoint}"


def relaxed_slo_policies(directory: Path) -> Path:
    """A policies directory whose ``default`` policy is the repository's with SLOs any encoder
    meets (``min_recall`` 0, ``max_false_positive_rate`` 1): the canary gate runs and passes,
    for tests of what promotion does (the tiny encoder's decisions are meaningless)."""
    import yaml

    source = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
    document = yaml.safe_load(source.read_text())
    document["slo"] = {**document["slo"], "min_recall": 0.0, "max_false_positive_rate": 1.0}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.yaml").write_text(yaml.safe_dump(document))
    return directory
