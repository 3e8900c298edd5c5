"""The upload-hook API through Flask's test client (the dispatcher is in memory)."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from admin import create_app
from moderation.config import load_settings
from moderation.service.api_clients import create_api_client
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.queue import process_upload
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.models import Subject, Upload
from tests.conftest import skimage_photo


def jpeg(name: str = "coffee", size: int = 128) -> bytes:
    image = skimage_photo(name)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


def make_app(runtime: Runtime, dispatcher: RecordingDispatcher, **overrides: Any) -> Flask:
    settings = load_settings(data_dir=runtime.settings.data_dir, **overrides)
    return create_app({"SETTINGS": settings, "TESTING": True, "MODERATION_DISPATCHER": dispatcher})


def inline_dispatcher(runtime: Runtime, *, poll_interval: float = 60) -> RecordingDispatcher:
    """A dispatcher that screens each upload 0.2 s after it is sent, in a timer thread, with
    one worker state (encoder and current blocklist loaded now, before any request)."""
    state = WorkerState(runtime, poll_interval=poll_interval)
    state.screener()

    class Inline(RecordingDispatcher):
        def send_screening(self, upload_id: str) -> None:
            super().send_screening(upload_id)
            threading.Timer(
                0.2, process_upload, (runtime, upload_id, state.screener), {"max_attempts": 3}
            ).start()

    return Inline()


@pytest.fixture
def app(runtime: Runtime, dispatcher: RecordingDispatcher) -> Flask:
    return make_app(runtime, dispatcher, max_image_bytes=200_000, api_rate_limit="100/minute")


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def new_token(runtime: Runtime, name: str = "acme") -> str:
    with transaction(runtime.sessions) as session:
        created = create_api_client(
            session, runtime.keyring, name, callback_allowlist=["https://hooks.example.com/cb"]
        )
    return created.token


@pytest.fixture
def token(runtime: Runtime) -> str:
    return new_token(runtime)


def post(
    client: FlaskClient,
    token: str | None,
    data: bytes | None = None,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> Any:
    form: dict[str, Any] = {"external_id": "post-1", "subject_id": "user-42", **fields}
    if data is not None:
        form["image"] = (io.BytesIO(data), "upload.bin")
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return client.post(
        f"/api/v1/screenings{query}",
        data=form,
        headers=all_headers,
        content_type="multipart/form-data",
    )


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code


def test_accepts_and_queues(
    client: FlaskClient, token: str, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    response = post(client, token, jpeg(), subject_id="alice@example.com")
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued" and dispatcher.screenings == [body["id"]]
    assert response.headers["Location"] == f"/api/v1/screenings/{body['id']}"
    with runtime.sessions() as session:
        upload = session.get(Upload, body["id"])
        assert upload is not None and upload.source == "api"
        assert upload.subject_ref == session.scalar(select(Subject.ref))
        assert "alice" not in (upload.subject_ref or "")
    got = client.get(
        f"/api/v1/screenings/{body['id']}", headers={"Authorization": f"Bearer {token}"}
    )
    assert got.status_code == 202 and got.get_json()["status"] == "queued"


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer mod_wrong", "Basic abc"])
def test_auth_required(client: FlaskClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = client.post("/api/v1/screenings", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert "Bearer" in response.headers["WWW-Authenticate"]


def test_errors_are_json(client: FlaskClient, token: str) -> None:
    assert_error(post(client, token, None), 400, "bad_request")  # no image
    assert_error(post(client, token, jpeg(), external_id=""), 400)
    assert_error(post(client, token, b"%PDF-1.4 hello"), 415, "unsupported_type")
    assert_error(post(client, token, b"\xff\xd8\xff" + b"\0" * 300_000), 413, "too_large")
    assert_error(post(client, token, jpeg(), query="?wait=soon"), 400)
    assert_error(
        post(client, token, jpeg(), callback_url="https://evil.example/cb"),
        422,
        "callback_not_allowed",
    )
    assert_error(
        post(client, token, jpeg(), headers={"Idempotency-Key": "k" * 201}), 400, "bad_request"
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert_error(client.get("/api/v1/screenings/nope", headers=auth), 404, "not_found")
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(client.delete("/api/v1/screenings/x", headers=auth), 404)


def test_idempotency_key_one_row_one_result(
    client: FlaskClient, token: str, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    """Q6 through HTTP: one upload row, one task, the same id; processing twice gives one
    result."""
    headers = {"Idempotency-Key": "upload-abc"}
    first = post(client, token, jpeg(), headers=headers)
    second = post(client, token, jpeg(), headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert dispatcher.screenings == [first.get_json()["id"]]
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == 1
    other = post(client, token, jpeg("chelsea"), headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    # Another client may use the same key for its own upload.
    assert post(client, new_token(runtime, "other"), jpeg(), headers=headers).status_code == 202


def test_rate_limited(runtime: Runtime, dispatcher: RecordingDispatcher, token: str) -> None:
    client = make_app(runtime, dispatcher, api_rate_limit="2/minute").test_client()
    assert post(client, token, jpeg()).status_code == 202
    assert post(client, token, jpeg()).status_code == 202
    response = post(client, token, jpeg())
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    # The limit is per client.
    assert post(client, new_token(runtime, "other"), jpeg()).status_code == 202


def test_wait_returns_the_result(
    client: FlaskClient, token: str, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    """?wait= answers 200 with the result once a worker records it within the wait."""
    inline_client = make_app(runtime, inline_dispatcher(runtime)).test_client()
    response = post(inline_client, token, jpeg(), query="?wait=10")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "done" and body["result"]["decision"] == "allow"
    got = client.get(
        f"/api/v1/screenings/{body['id']}", headers={"Authorization": f"Bearer {token}"}
    )
    assert got.status_code == 200 and got.get_json()["result"] == body["result"]
    # Another client cannot read it.
    foreign = client.get(
        f"/api/v1/screenings/{body['id']}",
        headers={"Authorization": f"Bearer {new_token(runtime, 'other')}"},
    )
    assert_error(foreign, 404)


def test_openapi_document(client: FlaskClient) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    post_op = doc["paths"]["/api/v1/screenings"]["post"]
    assert {"202", "400", "401", "413", "415", "429"} <= set(post_op["responses"])
    form = post_op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["required"]) == {"image", "external_id", "subject_id"}
    assert "/api/v1/screenings/{id}" in doc["paths"]


METRICS_TOKEN = "metrics-" + "0123456789abcdefghijklmnopqrstuvwxyz"


def test_status_and_metrics(runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    client = make_app(runtime, dispatcher, metrics_token=METRICS_TOKEN).test_client()
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert client.get("/status/live").get_json() == {"status": "ok"}
    response = client.get("/status", headers=auth)
    assert response.status_code == 503  # no worker has reported
    checks = response.get_json()["checks"]
    assert checks["database"]["ok"] and not checks["snapshot"]["ok"]
    assert client.get("/status/ready").get_json() == {"ready": False}
    state = WorkerState(runtime, poll_interval=60)
    state.refresh()
    ready = client.get("/status", headers=auth)
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["snapshot"]["workers"][0]["stale_s"] == 0.0
    public_ready = client.get("/status/ready")
    assert public_ready.status_code == 200 and public_ready.get_json() == {"ready": True}
    text = client.get("/metrics", headers=auth).get_data(as_text=True)
    for name in (
        "moderation_uploads",
        "moderation_results_total",
        "moderation_stage_seconds",
        "moderation_redeliveries_total",
        "moderation_reconciler_resends_total",
        "moderation_workers_alive 1.0",
    ):
        assert name in text, name


def test_no_settings_leak_between_apps(runtime: Runtime) -> None:
    """Each app builds its own services (tests create many apps in one process)."""
    a = make_app(runtime, RecordingDispatcher())
    b = make_app(runtime, RecordingDispatcher())
    assert a.extensions["moderation.api"] is not b.extensions["moderation.api"]
