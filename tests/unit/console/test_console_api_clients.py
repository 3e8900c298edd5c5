"""The console's "API clients" page: admins only; revocation, rotations and the allowlist go
through CSRF-protected forms, are audited with the admin as actor, show new credentials once,
and are in force at once on another web process (a second app on the same database)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from moderation.service.api_clients import NewClient, create_api_client
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, AuditEvent
from tests.unit.test_api_client_lifecycle import api_status as web_api_status

HOOKS = "https://hooks.example.com/moderation"


def make_client(runtime: Runtime, name: str = "acme") -> NewClient:
    with transaction(runtime.sessions) as db:
        return create_api_client(db, runtime.keyring, name, callback_allowlist=[HOOKS])


def api_status(app: Flask, token: str) -> int:
    """401 for a refused token; 404 (no such screening) once the token is accepted."""
    return web_api_status(app.test_client(), token)


def revealed(html: str, element: str) -> str:
    match = re.search(rf'<code class="secret" id="{element}">([^<]+)</code>', html)
    assert match, html[:3000]
    return match.group(1)


def audit(runtime: Runtime, client_id: int) -> list[AuditEvent]:
    with runtime.sessions() as db:
        return list(
            db.scalars(
                select(AuditEvent)
                .where(AuditEvent.target == f"client:{client_id}")
                .order_by(AuditEvent.seq)
            )
        )


@pytest.mark.parametrize("role", ["reviewer", "auditor", "dpo"])
def test_only_admins_see_or_change_api_clients(
    role: str, client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    created = make_client(console_runtime)
    client.login(make_user(role))
    assert client.get("/clients").status_code == 403
    assert "/clients" not in client.get("/account").get_data(as_text=True)
    token = client.token("/account")
    for path, data in (
        (f"/clients/{created.client_id}/revoke", {"confirm_name": "acme"}),
        (f"/clients/{created.client_id}/rotate", {"what": "token"}),
        (f"/clients/{created.client_id}/allowlist", {"allowlist": "", "submitted": "1"}),
        ("/clients", {"name": "evil"}),
    ):
        assert client.post(path, data={**data, "csrf_token": token}).status_code == 403
    with console_runtime.sessions() as db:
        row = db.get(ApiClient, created.client_id)
        assert row is not None and row.revoked_at is None and row.callback_allowlist == [HOOKS]
        assert db.scalar(select(ApiClient).where(ApiClient.name == "evil")) is None


def test_forms_need_a_csrf_token(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    created = make_client(console_runtime)
    client.login(make_user("admin"))
    response = client.post(f"/clients/{created.client_id}/revoke", data={"confirm_name": "acme"})
    assert response.status_code == 400
    with console_runtime.sessions() as db:
        row = db.get(ApiClient, created.client_id)
        assert row is not None and row.revoked_at is None


def test_admin_revokes_and_another_web_process_refuses_the_token_at_once(
    client: Any,
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    created = make_client(console_runtime)
    other = make_app()  # a second web process on the same database
    assert api_status(other, created.token) == 404
    admin = make_user("admin")
    client.login(admin)
    page = client.get("/clients").get_data(as_text=True)
    assert "acme" in page and HOOKS in page and created.token not in page
    wrong = client.form(
        f"/clients/{created.client_id}/revoke", {"confirm_name": "acm"}, token_from="/clients"
    )
    assert wrong.status_code == 302
    assert api_status(other, created.token) == 404
    done = client.form(
        f"/clients/{created.client_id}/revoke", {"confirm_name": "acme"}, token_from="/clients"
    )
    assert done.status_code == 302
    assert api_status(other, created.token) == 401
    assert api_status(client.application, created.token) == 401
    assert "revoked" in client.get("/clients").get_data(as_text=True)
    (event,) = [e for e in audit(console_runtime, created.client_id) if e.action.endswith("revoke")]
    assert event.actor == f"user:{admin.id}"


def test_admin_rotates_the_token_shown_once(
    client: Any,
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    created = make_client(console_runtime)
    other = make_app()
    admin = make_user("admin")
    client.login(admin)
    response = client.form(
        f"/clients/{created.client_id}/rotate", {"what": "token"}, token_from="/clients"
    )
    assert response.status_code == 200
    assert "no-store" in response.headers["Cache-Control"]
    token = revealed(response.get_data(as_text=True), "new-token")
    assert api_status(other, created.token) == 401
    assert api_status(other, token) == 404
    assert token not in client.get("/clients").get_data(as_text=True)  # shown once
    actions = [(e.action, e.actor) for e in audit(console_runtime, created.client_id)]
    assert ("api_client.rotate_token", f"user:{admin.id}") in actions


def test_admin_rotates_the_callback_secret_and_sets_the_allowlist(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    from moderation.service.api_clients import callback_secret

    created = make_client(console_runtime)
    admin = make_user("admin")
    client.login(admin)
    response = client.form(
        f"/clients/{created.client_id}/rotate", {"what": "callback_secret"}, token_from="/clients"
    )
    secret = revealed(response.get_data(as_text=True), "new-callback-secret")
    assert secret != created.callback_secret
    with console_runtime.sessions() as db:
        row = db.get(ApiClient, created.client_id)
        assert row is not None and callback_secret(row, console_runtime.keyring) == secret

    path = f"/clients/{created.client_id}/allowlist"
    bad = client.form(path, {"allowlist": "ftp://x/", "submitted": "1"}, token_from="/clients")
    assert bad.status_code == 400 and "http(s)" in bad.get_data(as_text=True)
    # RELIABILITY.md S4-S5 at registration: production settings refuse these entries.
    for entry, why in (
        ("https://a.example/cb/../admin", "normal form"),
        ("https://169.254.169.254/latest", "not a public address"),
        ("http://127.0.0.1:9000/hooks", "not a public address"),
        ("http://a.example/cb", "must be https"),
    ):
        bad = client.form(path, {"allowlist": entry, "submitted": "1"}, token_from="/clients")
        assert bad.status_code == 400 and why in bad.get_data(as_text=True), entry
    good = client.form(
        path,
        {"allowlist": "https://a.example/cb\n\n https://b.example/ ", "submitted": "1"},
        token_from="/clients",
    )
    assert good.status_code == 302
    with console_runtime.sessions() as db:
        row = db.get(ApiClient, created.client_id)
        assert row is not None
        assert row.callback_allowlist == ["https://a.example/cb", "https://b.example/"]
    actions = [(e.action, e.actor) for e in audit(console_runtime, created.client_id)]
    assert ("api_client.rotate_callback_secret", f"user:{admin.id}") in actions
    assert ("api_client.set_allowlist", f"user:{admin.id}") in actions


def test_admin_creates_a_client_with_credentials_shown_once(
    client: Any,
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    client.login(make_user("admin"))
    response = client.form(
        "/clients", {"name": "platform-b", "allowlist": HOOKS}, token_from="/clients"
    )
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    token = revealed(html, "new-token")
    assert len(revealed(html, "new-callback-secret")) == 64
    assert api_status(make_app(), token) == 404
    taken = client.form("/clients", {"name": "platform-b"}, token_from="/clients")
    assert taken.status_code == 400 and "already exists" in taken.get_data(as_text=True)
