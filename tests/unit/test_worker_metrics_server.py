"""The worker's own metrics endpoint (workers/metrics_server.py): served only to the metrics
bearer token, with the screening histograms that the latency alert reads."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import pytest
from pydantic import SecretStr

from moderation.config import Settings
from moderation.service.metrics import STAGE_SECONDS
from workers.metrics_server import serve_metrics

TOKEN = "worker-" + "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture
def url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    server = serve_metrics(0, TOKEN, host="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        assert exc.headers["WWW-Authenticate"].startswith("Bearer")
        return exc.code, exc.read().decode()


def test_worker_metrics_need_the_token(url: str) -> None:
    STAGE_SECONDS.labels(stage="total").observe(0.05)
    for token in (None, TOKEN[:-1], TOKEN + "x"):
        status, body = get(url, token)
        assert status == 401 and "moderation_" not in body
    status, body = get(url, TOKEN)
    assert status == 200
    assert 'moderation_stage_seconds_bucket{le="0.05",stage="total"}' in body


def test_worker_init_serves_metrics_on_the_configured_port(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from workers import celery_app, metrics_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configured = settings.model_copy(update={"worker_metrics_port": port})
    app = celery_app.create_celery(configured)
    servers = []

    def local(port: int, token: str) -> WSGIServer:
        servers.append(serve_metrics(port, token, host="127.0.0.1"))
        return servers[-1]

    monkeypatch.setattr(celery_app, "get_app", lambda: app)
    monkeypatch.setattr(metrics_server, "serve_metrics", local)
    celery_app._serve_worker_metrics()
    assert not servers  # no token configured: not served
    app.conf.moderation_settings = configured.model_copy(update={"metrics_token": SecretStr(TOKEN)})
    celery_app._serve_worker_metrics()
    try:
        assert get(f"http://127.0.0.1:{port}/metrics", TOKEN)[0] == 200
    finally:
        servers[0].shutdown()
        servers[0].server_close()
