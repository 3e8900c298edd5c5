"""Who may read the service's internals: ``/metrics`` and the detailed ``/status`` need the
metrics bearer token (404 when none is configured); liveness and readiness stay public and
say nothing about the host (no hostname, pid, versions, worker ids)."""

from __future__ import annotations

import os
import socket

import pytest
from flask import Flask

from admin import create_app
from moderation import __version__
from moderation.config import ConfigurationError, load_settings
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState

TOKEN = "scrape-" + "abcdefghijklmnopqrstuvwxyz0123456789"
PRIVATE = ("/metrics", "/status")


def build(runtime: Runtime, **overrides: object) -> Flask:
    settings = load_settings(data_dir=runtime.settings.data_dir, **overrides)
    return create_app({"SETTINGS": settings, "TESTING": True})


def test_without_a_configured_token_metrics_and_detailed_status_are_not_served(
    runtime: Runtime,
) -> None:
    client = build(runtime).test_client()
    for path in PRIVATE:
        response = client.get(path, headers={"Authorization": "Bearer anything"})
        assert response.status_code == 404, path
        assert b"moderation_" not in response.data and b"workers" not in response.data


@pytest.mark.parametrize("path", PRIVATE)
def test_the_metrics_token_is_required(runtime: Runtime, path: str) -> None:
    WorkerState(runtime, poll_interval=60).refresh()  # a worker id and encoder to leak
    client = build(runtime, metrics_token=TOKEN).test_client()
    for headers in (
        {},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        response = client.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert b"moderation_" not in response.data and b"worker" not in response.data
    allowed = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code in (200, 503)
    if path == "/metrics":
        assert allowed.status_code == 200
        assert b"moderation_workers_alive 1.0" in allowed.data
    else:
        assert allowed.get_json()["checks"]["snapshot"]["workers"]


def test_public_liveness_and_readiness_are_minimal(runtime: Runtime) -> None:
    WorkerState(runtime, poll_interval=60).refresh()
    client = build(runtime, metrics_token=TOKEN).test_client()
    live = client.get("/status/live")
    ready = client.get("/status/ready")
    assert live.status_code == 200 and live.get_json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.get_json() == {"ready": True}
    for response in (live, ready):
        text = response.get_data(as_text=True)
        for secret in (socket.gethostname(), str(os.getpid()), __version__):
            assert secret not in text
        assert "Server" not in response.headers or __version__ not in response.headers["Server"]


def test_a_short_metrics_token_is_refused_at_start() -> None:
    with pytest.raises(ConfigurationError, match="MODERATION_METRICS_TOKEN"):
        load_settings(metrics_token="short")
    assert load_settings(metrics_token="").metrics_token is None  # compose's ${VAR:-}
