"""The index section of ``moderation benchmark speed`` at a small size: its figures are
computed from real runs (no speed is asserted, only that the figures are consistent)."""

from __future__ import annotations

import numpy as np
import pytest

import moderation.banks.index.cosine as cosine_module
from moderation.benchmark.speed_index import bench_index, extrapolate


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
