"""The monitoring profile's Prometheus configuration, run for real: Debian's ``prometheus``
(installed with promtool by scripts/monitoring_tools.sh) scrapes a running ``moderation serve``
and ``moderation worker`` with the metrics bearer token and loads the alert rules.

The container-only parts of monitoring/prometheus/prometheus.yml are pointed at this machine:
the web target's address, the workers' DNS discovery (a static address here), the token file
and the rules path.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.queue_stack import (
    METRICS_TOKEN,
    RedisServer,
    Stack,
    free_port,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "monitoring" / "prometheus" / "prometheus.yml"
RULES = REPO / "monitoring" / "prometheus" / "rules.yml"


def local_config(tmp_path: Path, web: str, worker: str) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    token = tmp_path / "metrics-token"
    token.write_text(METRICS_TOKEN)
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token)
        job.pop("dns_sd_configs", None)
        target = web if job["job_name"] == "moderation" else worker
        job["static_configs"] = [{"targets": [target]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: run scripts/monitoring_tools.sh (make test does)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> str:
        port = free_port()
        log = (tmp_path / "prometheus.log").open("ab")
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def api(url: str, path: str, **params: str) -> Any:
    response = requests.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def test_prometheus_scrapes_web_and_worker_with_the_token_and_loads_the_rules(
    make_stack: Callable[..., Stack],
    redis_server: RedisServer,
    prometheus: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    stack = make_stack(database_url=None, broker_url=redis_server.url)
    stack.init()
    worker_port = free_port()
    stack.start_web()
    stack.start_worker(worker_metrics_port=worker_port)
    stack.wait_ready()
    url = prometheus(local_config(tmp_path, f"127.0.0.1:{stack.port}", f"127.0.0.1:{worker_port}"))

    def targets_up() -> list[Any] | None:
        try:
            active = api(url, "targets")["activeTargets"]
        except requests.RequestException:
            return None
        healthy = {t["labels"]["job"] for t in active if t["health"] == "up"}
        return active if healthy == {"moderation", "moderation-workers"} else None

    wait_until(targets_up, 120, "both scrape targets up")
    groups = {group["name"] for group in api(url, "rules")["groups"]}
    assert groups == {"moderation-screening", "moderation-snapshots-and-keys", "moderation-models"}

    def sample(query: str) -> list[Any] | None:
        return api(url, "query", query=query)["result"] or None

    for query in (
        'moderation_snapshot_age_seconds{bank="known-bad"}',
        "moderation_oldest_queued_upload_seconds == 0",
        'moderation_workers_alive{job="moderation"} >= 1',
        'up{job="moderation-workers"} == 1',
    ):
        wait_until(lambda query=query: sample(query), 60, query)
