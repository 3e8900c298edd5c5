"""The index and whole-process sections of ``moderation benchmark speed`` at a small size: their
figures are computed from real runs (no speed is asserted, only that the figures are
consistent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moderation.banks.index.cosine as cosine_module
from moderation.benchmark.speed_index import bench_index, extrapolate
from moderation.benchmark.speed_process import bench_process, cpu_model, describe
from moderation.config import Settings
from tests.conftest import skimage_photo


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    vectors = np.random.default_rng(3).standard_normal((60, 1280)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_index_section_reports_consistent_figures(
    real: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cosine_module, "PCA_MIN_ENTRIES", 2_500)
    lines: list[str] = []
    rows = bench_index(real, [2_000, 3_000], lines.append)
    flat, pca = rows
    assert flat["algorithm_params"] == {"algorithm": "flat"}
    assert flat["recall_at_10"] == 1.0  # exact search against exact search
    assert pca["algorithm_params"]["algorithm"] == "ivf_pca"
    assert pca["algorithm_params"]["nlist"] == 128  # sized for 3,000 entries
    assert 0.9 <= pca["recall_at_10"] <= pca["recall_at_10_tolerant"] <= 1.0
    for row in rows:
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["snapshot_load_s"] > 0 and row["peak_rss_mb"] > 0
        # The encrypted bank snapshot holds the index once plus ids and PDQ digests.
        assert row["snapshot_bytes"] > row["bytes_per_entry"] * row["entries"]
    assert flat["bytes_per_entry"] > 1280 * 4  # float32 rows
    assert 1280 * 2 < pca["bytes_per_entry"] < 1280 * 4  # float16 codes + candidates
    assert len(lines) == 4 and "recall@10" in lines[-1]
    projected = extrapolate(rows)
    assert projected is not None and projected["entries"] == 10_000_000
    assert projected["snapshot_load_s"] >= pca["snapshot_load_s"]


def test_process_section_times_moderation_screen_as_a_command(
    settings: Settings, tmp_path: Path
) -> None:
    """Issue 20: start-up time, peak RSS, images/s and the CPU model, from real child runs."""
    paths = []
    for name in ("chelsea", "coffee", "rocket"):
        paths.append(tmp_path / f"{name}.jpg")
        skimage_photo(name).save(paths[-1], quality=90)
    row = bench_process(paths, settings, bank_size=2, screen_count=3, repeats=1)
    assert row["cpu_model"] == cpu_model() and row["cpu_model"]
    assert row["startup_one_photo_s"] > 0 and row["screen_s"] > 0
    # A child's peak RSS: the interpreter, ONNX Runtime and the model, well under torch's.
    assert 20 < row["startup_peak_rss_mb"] < 1000
    assert row["images_per_s"] == round(3 / row["screen_s"], 1)
    assert row["help_s"] > 0 and row["screen_photos"] == 3
    # CPU seconds of each child's process tree (the figure to compare on a loaded machine; one
    # start's noise can exceed two photos' cost, so no order between the two is asserted).
    assert row["startup_cpu_s"] > 0 and row["screen_cpu_s"] > 0 and row["help_cpu_s"] > 0
    extra_ms = 1000 * max(row["screen_cpu_s"] - row["startup_cpu_s"], 0.0) / 2  # rounded inputs
    assert row["marginal_cpu_ms_per_photo"] == pytest.approx(extra_ms, abs=1.0)
    if row["marginal_cpu_ms_per_photo"] > 0:
        rate = row["cpus"] / (row["marginal_cpu_ms_per_photo"] / 1000)
        assert row["marginal_images_per_s_from_cpu"] == pytest.approx(rate, rel=0.01)
    lines = describe(row)
    assert "start-up, one photo" in lines[1] and "marginal" in lines[2]
    assert "idle cores" in lines[3] and "--help" in lines[4]
