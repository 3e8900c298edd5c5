"""RELIABILITY.md W4 and W10, against the real app: security headers on every response, plain
HTTP and HTTPS modes, and the settings production refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from moderation.config import ConfigurationError, load_settings
from moderation.service.runtime import Runtime
from tests.unit.console.conftest import (
    assert_security_headers,
    session_cookie,
)

# Test clients and users come from this directory's conftest fixtures.
ConsoleClient = Any
ConsoleUser = Any


SECRET_KEY = "another-test-secret-" + "0123456789abcdefghijklmnopqrstuvwxyz"


# --- W4: security headers on every response ----------------------------------------------


def test_w4_headers_on_pages_redirects_errors_and_crashes(
    app: Flask, client: ConsoleClient, make_user: Callable[..., ConsoleUser]
) -> None:
    def boom() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/test-boom", "test_boom", boom)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    responses = {
        "page": client.get("/login"),
        "redirect": client.get("/dashboard"),
        "not_found": client.get("/no/such/page"),
        "method": client.put("/login"),
        "static": client.get("/static/js/console.js"),
        "csrf": client.post("/login", data={}),
        "crash": client.get("/test-boom"),
    }
    expected = {
        "page": 200,
        "redirect": 302,
        "not_found": 404,
        "method": 405,
        "static": 200,
        "csrf": 400,
        "crash": 500,
    }
    for name, response in responses.items():
        assert response.status_code == expected[name], name
        assert_security_headers(response)
    assert "a bug" not in responses["crash"].get_data(as_text=True)
    reviewer = make_user("reviewer")
    client.login(reviewer)
    assert_security_headers(client.get("/dashboard"))  # 403


def test_w4_plain_http_localhost_mode_has_no_hsts_and_no_secure_cookie(
    make_app: Callable[..., Flask], console_runtime: Runtime
) -> None:
    app = make_app(environment="development", console_plain_http_localhost=True)
    http = app.test_client()
    page = http.get("/login", base_url="http://localhost")
    assert page.status_code == 200
    assert_security_headers(page, hsts=False)
    value, flags = session_cookie(page, "moderation_session")
    assert value and not flags["secure"] and flags["httponly"]
    # Plain HTTP is for this machine only.
    assert http.get("/login", base_url="http://console.example.org").status_code == 400


def test_w4_https_app_redirects_plain_http_pages_but_not_machine_endpoints(
    client: ConsoleClient,
) -> None:
    response = client.get("/login", base_url="http://localhost")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://localhost/login")
    behind_proxy = client.get(
        "/login", base_url="http://localhost", headers={"X-Forwarded-Proto": "https"}
    )
    assert behind_proxy.status_code == 200
    # Probes and upload hooks are not redirected (HSTS is sent only over HTTPS).
    for path in ("/status/live", "/api/v1/openapi.json"):
        machine = client.get(path, base_url="http://localhost")
        assert machine.status_code == 200, path
        assert_security_headers(machine, hsts=False)


# --- W10: production settings --------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [None, "changeme", "secret-key", "x" * 40, "short-but-random-7f3a"],
    ids=["missing", "placeholder", "placeholder2", "low-variety", "short"],
)
def test_w10_production_refuses_missing_or_default_secret_key(
    console_runtime: Runtime, secret: str | None
) -> None:
    from admin import create_app

    settings = load_settings(data_dir=console_runtime.settings.data_dir, secret_key=secret)
    assert settings.environment == "production"
    with pytest.raises(ConfigurationError, match="MODERATION_SECRET_KEY"):
        create_app({"SETTINGS": settings})


def test_w10_production_refuses_debug_and_plain_http(
    console_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from admin import create_app

    settings = load_settings(data_dir=console_runtime.settings.data_dir, secret_key=SECRET_KEY)
    app = create_app({"SETTINGS": settings})
    assert app.debug is False and app.testing is False
    app.extensions["moderation"].engine.dispose()

    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(ConfigurationError, match="debug"):
        create_app({"SETTINGS": settings})
    monkeypatch.delenv("FLASK_DEBUG")

    plain = load_settings(
        data_dir=console_runtime.settings.data_dir,
        secret_key=SECRET_KEY,
        console_plain_http_localhost=True,
    )
    with pytest.raises(ConfigurationError, match="PLAIN_HTTP"):
        create_app({"SETTINGS": plain})


def test_w10_secret_key_from_the_environment(
    console_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from admin import create_app

    monkeypatch.setenv("MODERATION_DATA_DIR", str(console_runtime.settings.data_dir))
    monkeypatch.setenv("MODERATION_SECRET_KEY", SECRET_KEY)
    app = create_app()
    assert app.config["SECRET_KEY"] == SECRET_KEY
    app.extensions["moderation"].engine.dispose()


def test_development_without_secret_key_starts_with_a_throw_away_key(
    console_runtime: Runtime,
) -> None:
    from admin import create_app

    settings = load_settings(data_dir=console_runtime.settings.data_dir, environment="development")
    first, second = create_app({"SETTINGS": settings}), create_app({"SETTINGS": settings})
    assert len(first.config["SECRET_KEY"]) >= 32
    assert first.config["SECRET_KEY"] != second.config["SECRET_KEY"]
    for app in (first, second):
        app.extensions["moderation"].engine.dispose()
