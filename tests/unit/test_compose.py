"""docker-compose.yml: valid for Docker Compose, with the services and safeguards the README
names. No Docker engine runs here; Debian's docker-compose (v1) parses and validates the file
without one (scripts/compose.sh installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


MONITORING = ("prometheus", "grafana")
SHARDS = ("worker-shard-0", "worker-shard-1")
PROFILES = {
    "prometheus": ["monitoring"],
    "grafana": ["monitoring"],
    "worker-gpu": ["gpu"],
    **{name: ["sharded"] for name in SHARDS},
}
REQUIRED = {
    "MODERATION_MASTER_KEYS": "k1:" + "A" * 43 + "=",
    "MODERATION_SECRET_KEY": "s" * 10 + "x" * 40,
    "MODERATION_METRICS_TOKEN": "m" * 10 + "y" * 40,
    "POSTGRES_PASSWORD": "p" * 10 + "z" * 30,
}


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed: run scripts/compose.sh (make test does)")
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MODERATION_") and k != "POSTGRES_PASSWORD"
    }
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose_config(**REQUIRED)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


def readme_services() -> set[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Docker Compose", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_-]+)` \|", section, flags=re.M))


def test_every_service_the_readme_names_exists(config: dict[str, Any]) -> None:
    named = readme_services()
    assert named == {
        "redis",
        "postgres",
        "migrate",
        "web",
        "proxy",
        "worker",
        "worker-gpu",
        "beat",
        *MONITORING,
        *SHARDS,
    }
    assert named == set(config["services"])


def test_redis_keeps_tasks(config: dict[str, Any]) -> None:
    command = " ".join(config["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_health_checks_and_start_order(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("redis", "postgres", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("migrate", "web", "worker", "worker-gpu", "beat"):
        env = services[name]["environment"]
        assert env["MODERATION_BROKER_URL"].startswith("redis://redis:")
        assert env["MODERATION_DATABASE_URL"].startswith("postgresql://")
        assert any(v.endswith(":/var/lib/moderation:rw") for v in services[name]["volumes"])


def test_master_keys_are_required() -> None:
    result = compose_config(POSTGRES_PASSWORD=REQUIRED["POSTGRES_PASSWORD"])
    assert result.returncode != 0
    assert "MODERATION_MASTER_KEYS" in result.stderr


def test_console_secret_key_is_required() -> None:
    result = compose_config(
        MODERATION_MASTER_KEYS="k1:" + "A" * 43 + "=",
        POSTGRES_PASSWORD=REQUIRED["POSTGRES_PASSWORD"],
    )
    assert result.returncode != 0
    assert "MODERATION_SECRET_KEY" in result.stderr


def test_metrics_token_is_required(config: dict[str, Any]) -> None:
    result = compose_config(
        MODERATION_MASTER_KEYS="k1:" + "A" * 43 + "=",
        MODERATION_SECRET_KEY="s" * 10 + "x" * 40,
        POSTGRES_PASSWORD=REQUIRED["POSTGRES_PASSWORD"],
    )
    assert result.returncode != 0
    assert "MODERATION_METRICS_TOKEN" in result.stderr
    assert (
        config["services"]["web"]["environment"]["MODERATION_METRICS_TOKEN"] == "m" * 10 + "y" * 40
    )


def test_shard_workers_hold_one_shard_each_of_the_same_count(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["worker"]["environment"]["MODERATION_INDEX_SHARDS"] == "1"
    for shard, name in enumerate(SHARDS):
        assert services[name]["command"] == ["moderation", "worker", "--shard", str(shard)]
        assert services[name]["environment"]["MODERATION_INDEX_SHARDS"] == "2"
        assert services[name]["environment"]["MODERATION_BROKER_URL"].startswith("redis://")
    sharded = compose_config(**REQUIRED, MODERATION_INDEX_SHARDS="2")
    assert sharded.returncode == 0, sharded.stderr
    both = yaml.safe_load(sharded.stdout)["services"]
    assert {both[n]["environment"]["MODERATION_INDEX_SHARDS"] for n in ("worker", *SHARDS)} == {"2"}


def test_monitoring_and_gpu_run_only_in_their_profiles(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in MONITORING:
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    for name, service in services.items():
        assert service.get("profiles") == PROFILES.get(name), name


def test_no_secret_in_the_file_and_the_database_password_from_the_environment(
    config: dict[str, Any],
) -> None:
    text = COMPOSE.read_text()
    assert "moderation:moderation@" not in text
    for line in text.splitlines():
        if re.search(r"(PASSWORD|SECRET|TOKEN|KEYS)\w*:", line):
            assert "${" in line or line.strip().startswith("#"), line
    services = config["services"]
    password = REQUIRED["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name in ("migrate", "web", "worker", "beat"):
        env = services[name]["environment"]
        assert password not in env["MODERATION_DATABASE_URL"]
        assert env["MODERATION_DATABASE_PASSWORD"] == password
    missing = {k: v for k, v in REQUIRED.items() if k != "POSTGRES_PASSWORD"}
    result = compose_config(**missing)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_only_the_tls_proxy_is_published_and_web_trusts_one_proxy(
    config: dict[str, Any],
) -> None:
    services = config["services"]
    published = {name for name, s in services.items() if s.get("ports") and name not in MONITORING}
    assert published == {"proxy"}
    proxy = services["proxy"]
    targets = {
        str(p["target"]) if isinstance(p, dict) else p.split(":")[-1] for p in proxy["ports"]
    }
    assert targets == {"80", "443"}
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in proxy["volumes"] if "/" in v}
    assert mounts["/etc/caddy/Caddyfile"] == REPO / "deploy" / "Caddyfile"
    assert proxy["environment"]["MODERATION_TLS"] == "internal"  # self-signed by default
    assert proxy["depends_on"]["web"]["condition"] == "service_healthy"
    assert services["web"]["environment"]["MODERATION_CONSOLE_TRUSTED_PROXIES"] == "1"
    caddyfile = (REPO / "deploy" / "Caddyfile").read_text()
    assert "{$MODERATION_UPSTREAM:web:8000}" in caddyfile
    assert "read_header" in caddyfile


def test_cpu_image_takes_cpu_only_torch_and_gpu_image_is_separate(
    config: dict[str, Any],
) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.M)
    assert stages[-1] == "cpu"  # `docker build .` builds the CPU image
    assert "gpu" in stages
    cpu = dockerfile.split("AS cpu", 1)[1]
    assert "https://download.pytorch.org/whl/cpu" in dockerfile
    assert "--index-url" in cpu and "torch==2.14.1" in cpu
    pinned = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pinned  # the CPU image installs the version pyproject pins
    services = config["services"]
    for name in ("web", "worker", "beat", "migrate"):
        assert services[name]["build"]["target"] == "cpu", name
    gpu = services["worker-gpu"]
    assert gpu["build"]["target"] == "gpu"
    assert gpu["environment"]["MODERATION_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_web_with_the_metrics_token_and_loads_the_rules(
    config: dict[str, Any],
) -> None:
    prometheus = config["services"]["prometheus"]
    assert prometheus["environment"]["MODERATION_METRICS_TOKEN"] == "m" * 10 + "y" * 40
    script = " ".join(prometheus["command"])
    scrape = yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    token_file = scrape["scrape_configs"][0]["authorization"]["credentials_file"]
    assert f'"$$MODERATION_METRICS_TOKEN" > {token_file}' in script
    assert Path(token_file).parent.as_posix() in prometheus["tmpfs"]
    mounts = {
        v.split(":")[1]: Path(v.split(":")[0]) for v in prometheus["volumes"] if v.startswith("/")
    }
    assert mounts["/etc/prometheus/rules.yml"] == REPO / "monitoring/prometheus/rules.yml"
    assert mounts["/etc/prometheus/prometheus.yml"] == REPO / "monitoring/prometheus/prometheus.yml"
    assert scrape["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert all(path.exists() for path in mounts.values())
    workers = next(j for j in scrape["scrape_configs"] if j["job_name"] == "moderation-workers")
    worker_env = config["services"]["worker"]["environment"]
    assert str(workers["dns_sd_configs"][0]["port"]) == worker_env["MODERATION_WORKER_METRICS_PORT"]
    assert workers["authorization"]["credentials_file"] == token_file
    assert worker_env["MODERATION_METRICS_TOKEN"] == "m" * 10 + "y" * 40


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(
    config: dict[str, Any],
) -> None:
    grafana = config["services"]["grafana"]
    mounts = {
        v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources" / "prometheus.yml").exists()
    providers = yaml.safe_load((provisioning / "dashboards" / "moderation.yml").read_text())
    dashboards = Path(providers["providers"][0]["options"]["path"])
    assert (mounts[dashboards.as_posix()] / "moderation.json").exists()
    assert grafana["environment"]["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_web_answers_the_proxy_site_and_prometheus_by_name(config: dict[str, Any]) -> None:
    # RELIABILITY.md S10: web refuses other Host headers, so the names it is reached by are
    # trusted: the proxy's site address and the service name Prometheus scrapes.
    services = config["services"]
    hosts = services["web"]["environment"]["MODERATION_TRUSTED_HOSTS"].split(",")
    assert services["proxy"]["environment"]["MODERATION_SITE_ADDRESS"] in hosts
    scrape = yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target.split(":")[0]
        for job in scrape["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert "web" in targets and "web" in hosts
