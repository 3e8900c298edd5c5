"""RELIABILITY.md W1-W3, W6, W8 and step-up re-authentication, against the real app: session
cookies and ids, logout, CSRF, TOTP reuse and guessing, login rate limits, idle and absolute
session lifetimes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from moderation.service.runtime import Runtime
from moderation.storage.console import ConsoleSession
from moderation.storage.models import AuditEvent
from tests.unit.console.conftest import (
    COOKIE,
    assert_security_headers,
    session_cookie,
)

# Test clients and users come from this directory's conftest fixtures.
ConsoleClient = Any
ConsoleUser = Any


CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no csrf_token field"
    return match.group(1)


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
    assert_security_headers(blocked)
    assert audit_count(console_runtime, "auth.login", "failure") == 5
    # Another address is not affected.
    other = client.post(
        "/login",
        data={"email": reviewer.email, "password": reviewer.password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": "127.0.0.2", "HTTP_REFERER": "https://localhost/"},
    )
    assert other.status_code == 302


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
