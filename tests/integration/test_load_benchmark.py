"""``moderation benchmark load --quick`` through the CLI, end to end: a private Redis, real
``serve`` and ``worker`` processes, SQLite and a temporary PostgreSQL database (issue 19).

The phases are tiny (3 s: 9 steady uploads, 36 per burst from 4 clients at 3 uploads/s each
against a limit of 2/second), so the figures are not asserted as timings: only that every field
is there, the counts add up, the per-client limit refused some of the first burst and none
once lifted, and that nothing accepted was lost or decided wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moderation.benchmark.processes import REPO

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PHASES = ("steady", "burst", "burst_unlimited")
ROWS = (
    "sent uploads/s (achieved)",
    "HTTP 202",
    "HTTP 429",
    "HTTP 503",
    "accepted POST p50 / p99 ms",
    "upload-to-result p50 / p99 s",
    "lost",
    "wrong",
    "peak RSS web MiB",
    "peak RSS worker MiB",
    "peak RSS redis MiB",
    "/status/live max ms",
)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX model build for both databases' runs."""
    return tmp_path_factory.mktemp("model-cache")


def _run_quick(database: str, tmp_path: Path, model_cache: Path) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env["PYTHONPATH"] = str(REPO)
    env["MODERATION_DATA_DIR"] = str(tmp_path / "unused-var")
    out = tmp_path / "load.json"
    argv = ["benchmark", "load", "--quick", "--database", database]
    argv += ["--model-cache", str(model_cache), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "moderation", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def _check_phase(name: str, phase: dict) -> None:
    status = phase["status"]
    assert sum(status.values()) == phase["requests"], (name, phase)
    assert phase["accepted"] == status["202"] + status["200"], (name, phase)
    assert phase["accepted"] + phase["refused"] == phase["requests"]
    assert status["other"] == 0, (name, phase)  # no connection errors or timeouts
    # Nothing accepted is lost, every decision is the expected one.
    assert phase["lost"] == 0 and phase["finished"] == phase["accepted"], (name, phase)
    assert phase["wrong"] == 0, (name, phase["wrong_kinds"])
    assert sum(phase["decisions"].values()) == phase["finished"]
    assert 0 < phase["post_p50_ms"] <= phase["post_p99_ms"], (name, phase)
    assert phase["sent_per_s"] > 0 and phase["sending_s"] > 0, (name, phase)
    assert 0 < phase["result_p50_s"] <= phase["result_p99_s"], (name, phase)
    for component in ("web", "worker", "redis"):
        assert phase["peak_rss_mb"][component] > 1, (name, component, phase["peak_rss_mb"])
    # The web tier (gunicorn master + workers) and the worker hold more than Redis does.
    assert phase["peak_rss_mb"]["web"] > phase["peak_rss_mb"]["redis"]
    if name == "steady":
        assert phase["live"] is None
    else:
        assert phase["live"]["probes"] > 0 and phase["live"]["max_ms"] > 0, phase["live"]


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_quick_load_benchmark(
    database: str, tmp_path: Path, model_cache: Path, request: pytest.FixtureRequest
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/services.sh expects it)")
    if database == "postgresql":
        request.getfixturevalue("postgres_server")  # skips, saying why, without a server

    stdout, report = _run_quick(database, tmp_path, model_cache)

    assert list(report["databases"]) == [database]
    phases = report["databases"][database]["phases"]
    assert tuple(phases) == PHASES
    for name, phase in phases.items():
        _check_phase(name, phase)
    # --quick: 3 s at 3 uploads/s, then 3 s at 12 uploads/s, twice.
    assert [phases[n]["requests"] for n in PHASES] == [9, 36, 36]
    # Steady stays under the per-client limit; the first burst goes over it (3/s per client
    # against 2/second); lifted, the same burst is accepted more (backpressure may still
    # refuse some, with 429 or 503).
    assert phases["steady"]["refused"] == 0
    assert phases["burst"]["status"]["429"] > 0
    assert phases["burst"]["client_limit"] == "2/second"
    assert phases["burst_unlimited"]["client_limit"] is None
    assert phases["burst_unlimited"]["accepted"] > phases["burst"]["accepted"]
    # The pool mixes banked copies and unrelated images: both kinds of decision came back.
    decided = {d for phase in phases.values() for d in phase["decisions"]}
    assert {"allow", "block"} <= decided, decided

    for label in ROWS:
        assert label in stdout, label
    assert "burst_unlimited" in stdout and database in stdout
