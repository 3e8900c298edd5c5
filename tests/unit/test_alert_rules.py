"""The Prometheus alert rules, the scrape config and the Grafana dashboard in monitoring/.

``promtool`` (Debian's ``prometheus`` package; ``scripts/monitoring_tools.sh`` installs it, and
``make test`` runs that) checks the rules and the config and runs the rule unit tests in
monitoring/prometheus/tests/ (the recall alert firing when the canary gauge drops among them).
Every metric a rule or a dashboard panel names must be one the code defines: a cheap guard
against typos that would leave an alert silent forever.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
RULES = MONITORING / "prometheus" / "rules.yml"
RULE_TESTS = sorted((MONITORING / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "dashboards" / "moderation.json"
RUNBOOKS = REPO / "docs" / "runbooks"

#: Metrics of the issue-18 contract that the canary and encoder branches define, by the module
#: (a glob under moderation/) that provides them. Until that module exists on this branch the
#: rules may name them; once it exists, they must be defined in the code like every other one.
CONTRACT_METRICS = {
    "modelops/canary*.py": {
        "moderation_canary_micro_ap",
        "moderation_canary_recall",
        "moderation_canary_false_positive_rate",
        "moderation_canary_last_run_timestamp_seconds",
        "moderation_slo_min_recall",
        "moderation_slo_max_false_positive_rate",
    },
    "modelops/drift*.py": {"moderation_drift_score", "moderation_drift_threshold"},
    "modelops/encoder_migration*.py": {
        "moderation_encoder_migration_progress_ratio",
        "moderation_shadow_decisions_total",
    },
}
#: Runbooks the encoder and canary branches write (issue 18's contract).
CONTRACT_RUNBOOKS = {"recall-drop.md", "encoder-rollback.md"}
#: Series Prometheus makes itself.
BUILTIN = {"up"}
#: What prometheus-client appends to a metric's name, by type.
SUFFIXES = ("", "_total", "_created", "_bucket", "_sum", "_count")

_METRIC_RE = re.compile(r"\bmoderation[_:][a-z0-9_:]*")


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed: run scripts/monitoring_tools.sh (make test does)")
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def defined_metrics() -> set[str]:
    """Every series name the code can export: the ``"moderation_..."`` string literals of
    moderation/, admin/ and workers/, with prometheus-client's suffixes."""
    names: set[str] = set()
    for package in ("moderation", "admin", "workers"):
        for path in (REPO / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](moderation_[a-z0-9_]+)[\"']", path.read_text()))
    return {name + suffix for name in names for suffix in SUFFIXES}


def pending_contract_metrics() -> set[str]:
    """Contract metrics whose providing module is not on this branch yet."""
    return {
        name
        for pattern, names in CONTRACT_METRICS.items()
        if not any((REPO / "moderation").glob(pattern))
        for name in names
    }


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def referenced(expr: str) -> set[str]:
    return set(_METRIC_RE.findall(expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(unit: Path) -> None:
    result = promtool("test", "rules", unit.name, cwd=unit.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_recall_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load((MONITORING / "prometheus" / "tests" / "models.yml").read_text())
    fired = [
        case
        for test in tests["tests"]
        if any("moderation_canary_recall" in s["series"] for s in test["input_series"])
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == "ModerationCanaryRecallBelowSlo" and case["exp_alerts"]
    ]
    assert fired


def test_every_metric_a_rule_or_panel_names_is_defined() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = defined_metrics() | pending_contract_metrics() | recorded | BUILTIN
    exprs = [rule["expr"] for rule in rules()]
    exprs += [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    unknown = {name for expr in exprs for name in referenced(expr)} - known
    assert not unknown, f"rules or panels name metrics the code does not define: {unknown}"
    # The guard itself sees a typo.
    assert referenced("rate(moderation_stage_secnds_bucket[5m])") - known


def test_every_alert_names_a_severity_and_an_existing_runbook() -> None:
    written = {path.name for path in RUNBOOKS.glob("*.md")}
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 15
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "ticket"}, alert["alert"]
        assert alert["labels"]["runbook"] in written | CONTRACT_RUNBOOKS, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


def test_the_issue_signals_each_have_an_alert() -> None:
    exprs = " ".join(rule["expr"] for rule in rules())
    for metric in (
        "moderation_stage_seconds_bucket",  # p99 screening latency
        "moderation_oldest_queued_upload_seconds",
        "moderation_unscannable_results_total",
        "moderation_enqueue_failures_total",
        "moderation_callback_deliveries",
        "moderation_canary_recall",
        "moderation_slo_min_recall",
        "moderation_canary_false_positive_rate",
        "moderation_slo_max_false_positive_rate",
        "moderation_drift_threshold",
        "moderation_snapshot_age_seconds",
        "moderation_key_age_seconds",
    ):
        assert metric in exprs, metric


def test_dashboard_has_executive_on_call_and_debug_rows() -> None:
    document = json.loads(DASHBOARD.read_text())
    rows = [p["title"].split(":")[0] for p in document["panels"] if p["type"] == "row"]
    assert rows == ["Executive", "On-call", "Debug"]
    assert all(panel["targets"] for panel in dashboard_panels())
    assert {p["datasource"]["uid"] for p in dashboard_panels()} == {"prometheus"}
    datasources = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    assert yaml.safe_load(datasources.read_text())["datasources"][0]["uid"] == "prometheus"


def test_scrape_config_is_valid_and_sends_the_metrics_token(tmp_path: Path) -> None:
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["moderation"]["static_configs"][0]["targets"] == ["web:8000"]
    assert jobs["moderation-workers"]["dns_sd_configs"][0]["names"] == ["worker"]
    # The container paths, pointed at local files for promtool.
    token = tmp_path / "token"
    token.write_text("t" * 40)
    for job in jobs.values():
        assert job["authorization"]["type"] == "Bearer"
        job["authorization"]["credentials_file"] = str(token)
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses expressions only inside rules: each panel query as a recording rule.
    records = [
        {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": target["expr"]}
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]
    assert len(records) >= 25
    queries = tmp_path / "dashboard_queries.yml"
    queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = promtool("check", "rules", str(queries))
    assert result.returncode == 0, result.stdout + result.stderr
