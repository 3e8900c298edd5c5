"""`moderation api-client create`, and what `serve` / `worker` / `beat` exec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from moderation.cli import main
from moderation.config import Settings
from moderation.service.runtime import Runtime
from moderation.storage.models import ApiClient, AuditEvent


def run(settings: Settings, *args: str) -> Any:
    env = {"MODERATION_DATA_DIR": str(settings.data_dir)}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_api_client_create_prints_credentials_once(settings: Settings, runtime: Runtime) -> None:
    result = run(
        settings,
        "api-client",
        "create",
        "acme",
        "--callback-allowlist",
        "https://hooks.acme.example/moderation",
    )
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"client_id", "token", "callback_secret"} <= set(created)
    assert created["token"].startswith("mod_") and len(created["callback_secret"]) == 64
    with runtime.sessions() as session:
        row = session.scalar(select(ApiClient))
        assert row is not None and row.callback_allowlist == [
            "https://hooks.acme.example/moderation"
        ]
        assert created["token"] not in row.token_hash
        assert session.scalar(select(AuditEvent).where(AuditEvent.action == "api_client.create"))
    again = run(settings, "api-client", "create", "acme")
    assert again.exit_code == 2 and "already exists" in again.output
    bad = run(settings, "api-client", "create", "other", "--callback-allowlist", "ftp://x/")
    assert bad.exit_code == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["serve", "--port", "9001"],
            ["-m", "gunicorn", "127.0.0.1:9001", "admin:create_app()", "gevent", "1000"],
        ),
        (
            ["serve", "--worker-class", "gthread", "--threads", "4"],
            ["-m", "gunicorn", "gthread", "--threads", "4", "admin:create_app()"],
        ),
        (
            ["worker", "--concurrency", "3", "--queues", "screening"],
            ["-m", "celery", "workers.celery_app:app", "worker", "screening", "3", "--beat"],
        ),
        (["beat"], ["-m", "celery", "workers.celery_app:app", "beat"]),
    ],
)
def test_service_commands_exec(
    settings: Settings,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expected: list[str],
) -> None:
    """The commands replace the process with gunicorn or Celery from this checkout."""
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_exec(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(os, "execvpe", fake_exec)
    result = run(settings, *args)
    assert result.exit_code == 0, result.output
    ((path, argv, env),) = calls
    assert path == argv[0]
    assert all(part in argv for part in expected), argv
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir()
    assert str(Path(__file__).resolve().parents[2]) in env["PYTHONPATH"].split(os.pathsep)


def test_serve_refuses_threads_without_gthread(settings: Settings, runtime: Runtime) -> None:
    """gevent workers have no thread pool: ``--threads`` would be silently ignored."""
    result = run(settings, "serve", "--threads", "16")
    assert result.exit_code == 2 and "gthread" in result.output


def test_worker_needs_initialised_data_dir(settings: Settings) -> None:
    result = run(settings, "worker")
    assert result.exit_code == 3 and "moderation init" in result.output


def test_shard_worker_consumes_its_queue_only(
    settings: Settings, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`worker --shard i` (issue 16 item 3): queue shard-i only, no beat; i must exist."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execvpe", lambda _path, argv, _env: calls.append(argv))
    env = {"MODERATION_DATA_DIR": str(settings.data_dir), "MODERATION_INDEX_SHARDS": "2"}
    result = CliRunner().invoke(main, ["worker", "--shard", "1"], env=env)
    assert result.exit_code == 0, result.output
    (argv,) = calls
    assert argv[argv.index("--queues") + 1] == "shard-1" and "--beat" not in argv
    beyond = CliRunner().invoke(main, ["worker", "--shard", "2"], env=env)
    assert beyond.exit_code == 2 and "shards are 0 to 1" in beyond.output
    unsharded = run(settings, "worker", "--shard", "0")
    assert unsharded.exit_code == 2 and "is 1, the index is not sharded" in unsharded.output
    assert len(calls) == 1
