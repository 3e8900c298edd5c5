"""User management and account pages: admins create users (TOTP URI shown once), disabling
needs a fresh sign-in, users set up their own TOTP; audit origins behind a trusted proxy."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pyotp
from sqlalchemy import select, update

from moderation.governance.users import has_totp
from moderation.service.runtime import Runtime
from moderation.storage.console import ConsoleSession
from moderation.storage.models import AuditEvent, User


def test_admin_creates_a_user_and_sees_the_totp_uri_once(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("admin"))
    created = client.form(
        "/users",
        {"email": "new.dpo@example.org", "role": "dpo", "password": "a long enough password"},
        token_from="/users",
    )
    assert created.status_code == 200
    html = created.get_data(as_text=True)
    uri = re.search(r'<code class="secret">(otpauth://totp/[^<]+)</code>', html)
    assert uri, html
    assert "otpauth://" not in client.get("/users").get_data(as_text=True)  # shown once
    secret = re.search(r"secret=([A-Z2-7]+)", uri.group(1)).group(1)  # type: ignore[union-attr]
    with console_runtime.sessions() as db:
        user = db.scalar(select(User).where(User.email == "new.dpo@example.org"))
        assert user is not None and user.role == "dpo" and has_totp(user)
    # The new user can sign in with the authenticator set up from that URI.
    fresh = client.application.test_client()
    fresh.runtime = console_runtime
    fresh.form(
        "/login",
        {"email": "new.dpo@example.org", "password": "a long enough password"},
        token_from="/login",
    )
    done = fresh.form("/login/totp", {"code": pyotp.TOTP(secret).now()}, token_from="/login/totp")
    assert done.status_code == 302 and done.headers["Location"] == "/gdpr"

    refused = client.form(
        "/users",
        {"email": "weak@example.org", "role": "reviewer", "password": "short"},
        token_from="/users",
    )
    assert refused.status_code == 400 and "at least 8" in refused.get_data(as_text=True)


def test_disabling_a_user_needs_step_up_and_ends_their_session(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    admin, reviewer = make_user("admin"), make_user("reviewer")
    victim = new_client()
    victim.login(reviewer)
    client.login(admin)
    with console_runtime.sessions() as db:
        mine = db.scalars(select(ConsoleSession).where(ConsoleSession.user_id == admin.id)).one()
    from moderation.storage.db import transaction

    with transaction(console_runtime.sessions) as db:
        db.execute(
            update(ConsoleSession)
            .where(ConsoleSession.id == mine.id)
            .values(data={**mine.data, "auth_at": time.time() - 3600})
        )
    stale = client.form(f"/users/{reviewer.id}/disabled", {"disabled": "1"}, token_from="/users")
    assert stale.headers["Location"].startswith("/reauth")
    assert victim.get("/review").status_code == 200
    client.form(
        "/reauth",
        {"password": admin.password, "code": client.totp_code(admin)},
        token_from="/reauth",
    )
    done = client.form(f"/users/{reviewer.id}/disabled", {"disabled": "1"}, token_from="/users")
    assert done.status_code == 302
    assert victim.get("/review").status_code == 302
    itself = client.form(f"/users/{admin.id}/disabled", {"disabled": "1"}, token_from="/users")
    assert itself.status_code == 302
    with console_runtime.sessions() as db:
        assert db.get(User, admin.id).disabled is False  # type: ignore[union-attr]


def test_reviewer_sets_up_totp_from_the_account_page(
    client: Any, new_client: Callable[[], Any], make_user: Callable[..., Any]
) -> None:
    reviewer = make_user("reviewer")
    client.login(reviewer)
    page = client.get("/account").get_data(as_text=True)
    assert "not set up" in page
    enrolled = client.form("/account/totp", {"confirm": "enrol"}, token_from="/account")
    assert enrolled.status_code == 200
    secret = re.search(r"secret=([A-Z2-7]+)", enrolled.get_data(as_text=True)).group(1)  # type: ignore[union-attr]
    later = new_client()
    step = later.form(
        "/login", {"email": reviewer.email, "password": reviewer.password}, token_from="/login"
    )
    assert step.headers["Location"] == "/login/totp"  # the password alone no longer suffices
    done = later.form("/login/totp", {"code": pyotp.TOTP(secret).now()}, token_from="/login/totp")
    assert done.headers["Location"] == "/review"


def test_audit_origin_comes_from_a_trusted_proxy_only(
    make_app: Callable[..., Any],
    client_for: Callable[[Any], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    reviewer = make_user("reviewer")
    forwarded = {"HTTP_X_FORWARDED_FOR": "203.0.113.7", "HTTP_X_FORWARDED_PROTO": "https"}
    for proxies, expected in ((0, "127.0.0.1"), (1, "203.0.113.7")):
        client = client_for(make_app(console_trusted_proxies=proxies))
        client.environ_base.update(forwarded)
        client.login(reviewer)
        with console_runtime.sessions() as db:
            event = db.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "auth.login")
                .order_by(AuditEvent.seq.desc())
            ).first()
        assert event is not None and event.origin == expected
