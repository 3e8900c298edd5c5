"""scripts/compare_benchmark_runs.py: the pooled comparison and issue 20's quality rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_json(ap: float, family_share: float, decision: str) -> dict[str, Any]:
    """A benchmark JSON with one method (classifier) on both splits."""
    method = {
        "name": "classifier",
        "micro_ap": ap,
        "recall_at_p99": 0.9,
        "per_edit_recall": {"rotate_15": family_share, "hflip": 1.0},
        "predictions": [{"query_id": "rotate_15/pos/0", "decision": decision}],
    }
    unseen = {
        "name": "classifier",
        "micro_ap": ap,
        "recall_at_p99": 0.8,
        "family_flagged": {"rotate_15": family_share},
        "unrelated_blocked": 0,
    }
    return {"methods": [method], "unseen_implementations": {"methods": [unseen]}}


def compare(tmp_path: Path, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Any:
    paths = []
    for side, runs in (("a", a), ("b", b)):
        for seed, run in enumerate(runs):
            path = tmp_path / f"{side}{seed}.json"
            path.write_text(json.dumps(run))
            paths.append(str(path))
    half = len(a)
    script = str(REPO / "scripts/compare_benchmark_runs.py")
    return subprocess.run(
        [sys.executable, script, "--a", *paths[:half], "--b", *paths[half:]],
        capture_output=True,
        text=True,
    )


def test_a_family_down_by_more_than_0_02_pooled_breaks_the_rule(tmp_path: Path) -> None:
    reference = [run_json(0.95, 0.90, "block"), run_json(0.95, 0.90, "block")]
    candidate = [run_json(0.951, 0.85, "review"), run_json(0.95, 0.90, "block")]
    out = compare(tmp_path, reference, candidate)
    assert out.returncode == 1, out.stderr
    assert "0.900 -> 0.875" in out.stdout  # pooled over the two seeds
    assert "classifier decisions changed: 1 of 2" in out.stdout
    assert "rule: broken" in out.stdout and "rotate_15" in out.stdout


def test_small_changes_keep_the_rule(tmp_path: Path) -> None:
    reference = [run_json(0.95, 0.90, "block")] * 3
    candidate = [run_json(0.947, 0.90, "block")] * 2 + [run_json(0.95, 0.85, "block")]
    out = compare(tmp_path, reference, candidate)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rule: kept" in out.stdout and "0.900 -> 0.883" in out.stdout
