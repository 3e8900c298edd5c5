"""``moderation benchmark encoders``' naming, per-encoder settings and comparison rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.benchmark.encoder_compare import (
    comparison_rows,
    encoder_settings,
    format_rows,
    method_name,
)
from moderation.benchmark.protocol import MethodResult
from moderation.config import load_settings


def result(name: str, micro_ap: float, recall: float) -> MethodResult:
    return MethodResult(
        name, [], 0.0, 1.0, 1.0, micro_ap, recall, None, 0.0, 0.0, {"screenshot": 1.0}
    )


def test_method_names_and_settings(tmp_path: Path) -> None:
    assert (
        method_name("timm/efficientnet_lite1", (False, False)) == "global-cosine:efficientnet_lite1"
    )
    assert method_name("timm/efficientnet_lite0", (True, False)) == "classifier:efficientnet_lite0"
    assert (
        method_name("timm/efficientnet_lite0", (True, True))
        == "classifier-windows:efficientnet_lite0"
    )
    base = load_settings(data_dir=tmp_path / "base")
    settings = encoder_settings(base, tmp_path, "timm/efficientnet_lite2", (True, True))
    assert settings.encoder == "timm/efficientnet_lite2"
    assert settings.classifier and settings.classifier_windows
    assert settings.data_dir == tmp_path / "classifier-windows-efficientnet_lite2"


def test_throughput_ratios_are_per_stage_against_the_first_encoder() -> None:
    results = [
        result("global-cosine:efficientnet_lite0", 0.95, 0.89),
        result("classifier:efficientnet_lite0", 0.99, 0.98),
        result("global-cosine:efficientnet_lite1", 0.94, 0.92),
        result("classifier:efficientnet_lite1", 0.98, 0.99),
    ]
    speed = {
        "global-cosine:efficientnet_lite0": 40.0,
        "classifier:efficientnet_lite0": 20.0,
        "global-cosine:efficientnet_lite1": 30.0,
        "classifier:efficientnet_lite1": 16.0,
    }
    rows = comparison_rows(results, speed, "efficientnet_lite0")
    ratios = {row["method"]: row["throughput_ratio"] for row in rows}
    assert ratios["global-cosine:efficientnet_lite1"] == pytest.approx(0.75)
    assert ratios["classifier:efficientnet_lite1"] == pytest.approx(0.80)
    assert ratios["classifier:efficientnet_lite0"] == pytest.approx(1.0)
    table = format_rows(rows)
    assert "| classifier:efficientnet_lite1 | 0.980 | 0.990 | 16.00 | 0.80 |" in table
