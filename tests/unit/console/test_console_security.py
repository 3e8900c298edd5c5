"""RELIABILITY.md W1-W4, W6, W8, W10 and step-up re-authentication, against the real app."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from moderation.config import ConfigurationError, load_settings
from moderation.service.runtime import Runtime
from moderation.storage.console import ConsoleSession
from moderation.storage.models import AuditEvent

# Test clients and users come from this directory's conftest fixtures.
ConsoleClient = Any
ConsoleUser = Any

COOKIE = "__Host-moderation_session"
SECRET_KEY = "another-test-secret-" + "0123456789abcdefghijklmnopqrstuvwxyz"
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no csrf_token field"
    return match.group(1)


def session_cookie(response: Any, name: str = COOKIE) -> tuple[str, dict[str, str]]:
    """The session cookie a response sets: value and attributes (lower-cased names)."""
    for header in response.headers.getlist("Set-Cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        if name in parsed:
            morsel = parsed[name]
            flags = {k.lower(): v for k, v in morsel.items() if v}
            lowered = header.lower()
            flags["secure"] = "secure" if "; secure" in lowered else ""
            flags["httponly"] = "httponly" if "; httponly" in lowered else ""
            return morsel.value, flags
    raise AssertionError(f"no {name} cookie set")


def audit_count(rt: Runtime, action: str, outcome: str | None = None) -> int:
    with rt.sessions() as db:
        query = select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
        if outcome:
            query = query.where(AuditEvent.outcome == outcome)
        return int(db.scalar(query) or 0)


# --- W1: cookie flags, new session id after login and after TOTP ----------------------------


def test_w1_cookie_flags_and_new_session_id_after_each_step(
    client: ConsoleClient, make_user: Callable[..., ConsoleUser], console_runtime: Runtime
) -> None:
    admin = make_user("admin")
    page = client.get("/login")
    anonymous_id, flags = session_cookie(page)
    assert flags["secure"] and flags["httponly"] and flags["samesite"].lower() == "lax"
    assert flags["path"] == "/"

    after_password = client.post(
        "/login",
        data={"email": admin.email, "password": admin.password, "csrf_token": csrf_from(page.text)},
    )
    assert after_password.status_code == 302
    password_id, flags = session_cookie(after_password)
    assert password_id != anonymous_id
    assert flags["secure"] and flags["httponly"] and flags["samesite"].lower() == "lax"

    after_totp = client.form(
        "/login/totp", {"code": client.totp_code(admin)}, token_from="/login/totp"
    )
    assert after_totp.status_code == 302
    totp_id, flags = session_cookie(after_totp)
    assert totp_id not in (anonymous_id, password_id)
    assert flags["secure"] and flags["httponly"]
    assert client.get("/dashboard").status_code == 200

    # The earlier ids are dead server-side: replaying them gets no session.
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(ConsoleSession)) == 1
    for old in (anonymous_id, password_id):
        other = client.application.test_client()
        other.set_cookie(COOKIE, old, domain="localhost", secure=True)
        assert other.get("/dashboard").status_code == 302


# --- W2: logout invalidates the session server-side -----------------------------------------


def test_w2_logout_then_replayed_cookie_is_rejected(
    client: ConsoleClient,
    new_client: Callable[[], ConsoleClient],
    make_user: Callable[..., ConsoleUser],
) -> None:
    reviewer = make_user("reviewer")
    response = client.login(reviewer)
    value, _ = session_cookie(response)
    assert client.get("/review").status_code == 200
    logout = client.form("/logout", {}, token_from="/review")
    assert logout.status_code == 302
    assert client.get("/review").status_code == 302

    replay = new_client()
    replay.set_cookie(COOKIE, value, domain="localhost", secure=True)
    again = replay.get("/review")
    assert again.status_code == 302
    assert again.headers["Location"].startswith("/login")


def test_w2_disabling_a_user_ends_their_sessions(
    client: ConsoleClient,
    make_user: Callable[..., ConsoleUser],
    console_runtime: Runtime,
) -> None:
    from moderation.governance.users import set_disabled
    from moderation.storage.db import transaction

    reviewer = make_user("reviewer")
    client.login(reviewer)
    assert client.get("/review").status_code == 200
    with transaction(console_runtime.sessions) as db:
        set_disabled(db, reviewer.id, disabled=True, actor="test")
    assert client.get("/review").status_code == 302


# --- W3: CSRF -----------------------------------------------------------------------------


def test_w3_post_without_or_with_foreign_csrf_token_is_refused(
    client: ConsoleClient,
    new_client: Callable[[], ConsoleClient],
    make_user: Callable[..., ConsoleUser],
    console_runtime: Runtime,
) -> None:
    admin = make_user("admin")
    client.login(admin)
    missing = client.post("/banks", data={"name": "b1", "kind": "block", "category": "x"})
    assert missing.status_code in (400, 403)

    stranger = new_client()
    foreign = stranger.token("/login")
    forged = client.post(
        "/banks", data={"name": "b2", "kind": "block", "category": "x", "csrf_token": foreign}
    )
    assert forged.status_code in (400, 403)

    # Nothing was created; the same form with the session's own token works.
    ok = client.form(
        "/banks", {"name": "b3", "kind": "block", "category": "x"}, token_from="/banks"
    )
    assert ok.status_code == 302
    with console_runtime.sessions() as db:
        from moderation.storage.models import Bank

        assert db.scalars(select(Bank.name)).all() == ["b3"]

    # The login form too: a token-less POST never reaches the password check.
    anonymous = new_client()
    assert (
        anonymous.post(
            "/login", data={"email": admin.email, "password": admin.password}
        ).status_code
        == 400
    )


# --- W4: security headers on every response ----------------------------------------------


def _assert_headers(response: Any, *, hsts: bool = True) -> None:
    csp = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    assert "object-src 'none'" in csp
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    assert response.headers.get("X-Frame-Options") == "DENY"
    if hsts:
        assert response.headers.get("Strict-Transport-Security", "").startswith("max-age=31536000")
    else:
        assert "Strict-Transport-Security" not in response.headers


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
        _assert_headers(response)
    assert "a bug" not in responses["crash"].get_data(as_text=True)
    reviewer = make_user("reviewer")
    client.login(reviewer)
    _assert_headers(client.get("/dashboard"))  # 403


def test_w4_plain_http_localhost_mode_has_no_hsts_and_no_secure_cookie(
    make_app: Callable[..., Flask], console_runtime: Runtime
) -> None:
    app = make_app(environment="development", console_plain_http_localhost=True)
    http = app.test_client()
    page = http.get("/login", base_url="http://localhost")
    assert page.status_code == 200
    _assert_headers(page, hsts=False)
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
        _assert_headers(machine, hsts=False)


# --- W6: TOTP reuse and guessing -----------------------------------------------------------


def test_w6_reused_totp_code_is_rejected(
    new_client: Callable[[], ConsoleClient],
    make_user: Callable[..., ConsoleUser],
    console_runtime: Runtime,
) -> None:
    admin = make_user("admin")
    first, second = new_client(), new_client()
    first.form("/login", {"email": admin.email, "password": admin.password}, token_from="/login")
    code = first.totp_code(admin)
    assert first.form("/login/totp", {"code": code}, token_from="/login/totp").status_code == 302

    second.form("/login", {"email": admin.email, "password": admin.password}, token_from="/login")
    replay = second.form("/login/totp", {"code": code}, token_from="/login/totp")
    assert replay.status_code == 200
    assert "already used" in replay.get_data(as_text=True)
    assert second.get("/dashboard").status_code == 302
    assert audit_count(console_runtime, "auth.totp", "failure") == 1


def test_w6_many_wrong_codes_are_audited_then_end_the_attempt(
    client: ConsoleClient, make_user: Callable[..., ConsoleUser], console_runtime: Runtime
) -> None:
    from admin.auth import MAX_TOTP_FAILURES

    dpo = make_user("dpo")
    client.form("/login", {"email": dpo.email, "password": dpo.password}, token_from="/login")
    token = client.token("/login/totp")
    statuses = [
        client.post("/login/totp", data={"code": "000000", "csrf_token": token}).status_code
        for _ in range(MAX_TOTP_FAILURES)
    ]
    assert statuses[:-1] == [200] * (MAX_TOTP_FAILURES - 1)
    assert statuses[-1] == 302  # back to the password step
    assert audit_count(console_runtime, "auth.totp", "failure") == MAX_TOTP_FAILURES
    assert client.get("/login/totp").status_code == 302


def test_w6_totp_guessing_is_rate_limited(
    make_app: Callable[..., Flask],
    client_for: Callable[[Flask], ConsoleClient],
    make_user: Callable[..., ConsoleUser],
) -> None:
    app = make_app(console_login_rate_limit="3 per minute")
    client = client_for(app)
    dpo = make_user("dpo")
    client.form("/login", {"email": dpo.email, "password": dpo.password}, token_from="/login")
    token = client.token("/login/totp")
    codes = [
        client.post("/login/totp", data={"code": "111111", "csrf_token": token}).status_code
        for _ in range(4)
    ]
    assert codes[:3] == [200, 200, 200]
    assert codes[3] == 429


# --- W8: login rate limit -----------------------------------------------------------------


def test_w8_many_logins_from_one_address_get_429(
    make_app: Callable[..., Flask],
    client_for: Callable[[Flask], ConsoleClient],
    make_user: Callable[..., ConsoleUser],
    console_runtime: Runtime,
) -> None:
    app = make_app(console_login_rate_limit="5 per minute")
    client = client_for(app)
    reviewer = make_user("reviewer")
    token = client.token("/login")
    statuses = [
        client.post(
            "/login",
            data={"email": reviewer.email, "password": "wrong password!", "csrf_token": token},
        ).status_code
        for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    # Even the right password is refused until the window passes; the 429 carries the headers.
    blocked = client.post(
        "/login", data={"email": reviewer.email, "password": reviewer.password, "csrf_token": token}
    )
    assert blocked.status_code == 429
    _assert_headers(blocked)
    assert audit_count(console_runtime, "auth.login", "failure") == 5
    # Another address is not affected.
    other = client.post(
        "/login",
        data={"email": reviewer.email, "password": reviewer.password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": "127.0.0.2", "HTTP_REFERER": "https://localhost/"},
    )
    assert other.status_code == 302


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


# --- step-up re-authentication --------------------------------------------------------------


def test_step_up_needed_for_destructive_actions_when_sign_in_is_old(
    client: ConsoleClient, make_user: Callable[..., ConsoleUser], console_runtime: Runtime
) -> None:
    from moderation.banks.records import create_bank
    from moderation.storage.db import transaction
    from moderation.storage.models import Bank

    admin = make_user("admin")
    client.login(admin)
    with transaction(console_runtime.sessions) as db:
        bank_id = create_bank(db, "bank-to-disable").id
        # The sign-in happened long ago (longer than console_step_up_seconds).
        for row in db.scalars(select(ConsoleSession)):
            db.execute(
                update(ConsoleSession)
                .where(ConsoleSession.id == row.id)
                .values(data={**row.data, "auth_at": time.time() - 3600})
            )
    page = f"/banks/{bank_id}"
    refused = client.form(f"/banks/{bank_id}/enabled", {"enabled": "0"}, token_from=page)
    assert refused.status_code == 302
    assert refused.headers["Location"].startswith("/reauth")
    with console_runtime.sessions() as db:
        assert db.get(Bank, bank_id).enabled is True  # type: ignore[union-attr]

    wrong = client.form(
        "/reauth", {"password": "not my password", "code": "000000"}, token_from="/reauth"
    )
    assert wrong.status_code == 200
    confirmed = client.form(
        "/reauth",
        {"password": admin.password, "code": client.totp_code(admin), "next": page},
        token_from="/reauth",
    )
    assert confirmed.status_code == 302 and confirmed.headers["Location"] == page
    done = client.form(f"/banks/{bank_id}/enabled", {"enabled": "0"}, token_from=page)
    assert done.status_code == 302 and done.headers["Location"] == page
    with console_runtime.sessions() as db:
        assert db.get(Bank, bank_id).enabled is False  # type: ignore[union-attr]
    assert audit_count(console_runtime, "auth.reauth", "failure") == 1
    assert audit_count(console_runtime, "auth.reauth", "success") == 1


def test_open_redirects_are_refused(
    new_client: Callable[[], ConsoleClient], make_user: Callable[..., ConsoleUser]
) -> None:
    reviewer = make_user("reviewer")
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        fresh = new_client()
        response = fresh.form(
            "/login",
            {"email": reviewer.email, "password": reviewer.password, "next": target},
            token_from="/login",
        )
        assert response.status_code == 302
        assert response.headers["Location"] == "/review"


@pytest.mark.parametrize("column", ["last_seen_at", "expires_at"])
def test_sessions_end_when_idle_or_past_their_lifetime(
    client: ConsoleClient,
    make_user: Callable[..., ConsoleUser],
    console_runtime: Runtime,
    column: str,
) -> None:
    from datetime import UTC, datetime, timedelta

    from moderation.storage.db import transaction

    client.login(make_user("reviewer"))
    assert client.get("/review").status_code == 200
    past = datetime.now(UTC) - timedelta(hours=9)
    with transaction(console_runtime.sessions) as db:
        db.execute(update(ConsoleSession).values({column: past}))
    assert client.get("/review").status_code == 302
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(ConsoleSession)) == 0
