"""API-client lifecycle: list, revoke, rotate the token or the callback secret, set the
allowlist; in force at once on every web process (two apps on one database), audited, and the
same through ``moderation api-client``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from admin import create_app
from moderation.config import Settings, load_settings
from moderation.service.api_clients import (
    ClientError,
    UnknownClientError,
    callback_secret,
    create_api_client,
    list_api_clients,
    record_use,
    revoke_api_client,
    rotate_callback_secret,
    rotate_token,
    set_allowlist,
)
from moderation.service.callback_urls import callback_policy
from moderation.service.callbacks import SIGNATURE_HEADER, deliver_callback, notify_decision
from moderation.service.platform_client import verify_callback
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, AuditEvent, CallbackDelivery, Upload
from tests.conftest import Cli, loopback_callbacks, migrated_runtime
from tests.integration.queue_stack import CallbackReceiver

HOOKS = "https://hooks.example.com/moderation"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The callback receiver listens on 127.0.0.1: the development loopback setting."""
    return loopback_callbacks(settings)


def web_process(data_dir: Path, **overrides: object) -> FlaskClient:
    """One more web process: its own app, engine and connection pool over the same database."""
    settings = load_settings(data_dir=data_dir, **overrides)
    app: Flask = create_app({"SETTINGS": settings, "TESTING": True})
    return app.test_client()


def api_status(web: FlaskClient, token: str) -> int:
    """401 for a refused token; 404 (no such screening) once the token is accepted."""
    response = web.get(
        "/api/v1/screenings/0123456789abcdef0123456789abcdef",
        headers={"Authorization": f"Bearer {token}"},
    )
    return response.status_code


def new_client(runtime: Runtime, name: str = "acme", allowlist: tuple[str, ...] = (HOOKS,)):  # type: ignore[no-untyped-def]
    with transaction(runtime.sessions) as session:
        return create_api_client(
            session,
            runtime.keyring,
            name,
            callback_allowlist=allowlist,
            policy=callback_policy(runtime.settings),
        )


def test_revocation_is_refused_at_once_by_every_web_process(
    settings: Settings, database_url: str
) -> None:
    shared = load_settings(data_dir=settings.data_dir, database_url=database_url)
    with migrated_runtime(shared) as rt:
        created = new_client(rt)
        first, second = (
            web_process(settings.data_dir, database_url=database_url) for _ in range(2)
        )
        assert api_status(first, created.token) == 404
        assert api_status(second, created.token) == 404
        with transaction(rt.sessions) as session:
            info = revoke_api_client(session, created.client_id, actor="test")
        assert info.state == "revoked" and info.revoked_at is not None
        assert api_status(first, created.token) == 401
        assert api_status(second, created.token) == 401
        for web in (first, second):
            web.application.extensions["moderation"].engine.dispose()


def test_rotated_token_replaces_the_old_one_at_once(runtime: Runtime) -> None:
    created = new_client(runtime)
    first, second = web_process(runtime.settings.data_dir), web_process(runtime.settings.data_dir)
    assert api_status(first, created.token) == api_status(second, created.token) == 404
    with transaction(runtime.sessions) as session:
        token = rotate_token(session, "acme", actor="test")
    assert token.startswith("mod_") and token != created.token
    assert api_status(first, created.token) == api_status(second, created.token) == 401
    assert api_status(first, token) == api_status(second, token) == 404


def test_callbacks_are_signed_with_the_rotated_secret(
    runtime: Runtime, receiver: CallbackReceiver
) -> None:
    created = new_client(runtime, allowlist=(receiver.prefix,))
    with transaction(runtime.sessions) as session:
        upload = Upload(
            client_id=created.client_id,
            callback_url=receiver.prefix + "/in",
            status="done",
            source="api",
        )
        session.add(upload)
        session.flush()
        notify_decision(session, upload.id)  # queued before the rotation
        delivery_id = session.scalar(select(CallbackDelivery.id))
    assert delivery_id is not None
    with transaction(runtime.sessions) as session:
        secret = rotate_callback_secret(session, runtime.keyring, created.client_id, actor="t")
    assert len(secret) == 64 and secret != created.callback_secret
    assert deliver_callback(runtime, delivery_id).state == "delivered"
    headers, body = receiver.received[-1]
    assert verify_callback(secret, headers[SIGNATURE_HEADER], body)
    assert not verify_callback(created.callback_secret, headers[SIGNATURE_HEADER], body)
    with runtime.sessions() as session:
        row = session.get(ApiClient, created.client_id)
        assert row is not None and bytes.fromhex(secret) not in row.callback_secret
        assert callback_secret(row, runtime.keyring) == secret


def test_set_allowlist_is_validated_like_creation(runtime: Runtime) -> None:
    created = new_client(runtime)
    loopback = "http://127.0.0.1:9000/"
    for bad in (
        ["ftp://x/"],
        ["https://a@b/"],
        ["https://h/p?q=1"],
        [HOOKS, "not a url"],
        [HOOKS + "/../admin"],
        ["https://169.254.169.254/latest"],
        [loopback],  # the production policy (the default) refuses loopback and plain http
    ):
        with transaction(runtime.sessions) as session, pytest.raises(ClientError):
            set_allowlist(session, created.client_id, bad, actor="test")
    with transaction(runtime.sessions) as session:
        saved = set_allowlist(
            session,
            created.client_id,
            [" https://new.example/cb ", "https://new.example/cb", loopback],
            actor="test",
            policy=callback_policy(runtime.settings),
        )
    assert saved == ("https://new.example/cb", "http://127.0.0.1:9000/")
    with runtime.sessions() as session:
        (info,) = list_api_clients(session)
    assert info.callback_allowlist == saved and info.state == "active"


def test_revocation_is_final_and_unknown_clients_are_named(runtime: Runtime) -> None:
    created = new_client(runtime)
    with transaction(runtime.sessions) as session:
        revoke_api_client(session, "acme", actor="test")
    for change in (
        lambda s: revoke_api_client(s, created.client_id, actor="test"),
        lambda s: rotate_token(s, created.client_id, actor="test"),
        lambda s: rotate_callback_secret(s, runtime.keyring, created.client_id, actor="test"),
        lambda s: set_allowlist(s, created.client_id, [HOOKS], actor="test"),
    ):
        with transaction(runtime.sessions) as session, pytest.raises(ClientError, match="revoked"):
            change(session)
    with transaction(runtime.sessions) as session, pytest.raises(UnknownClientError):
        rotate_token(session, "nobody", actor="test")


def test_every_lifecycle_action_is_audited_without_secrets(runtime: Runtime) -> None:
    created = new_client(runtime)
    with transaction(runtime.sessions) as session:
        token = rotate_token(session, created.client_id, actor="user:7", origin="10.0.0.1")
        secret = rotate_callback_secret(session, runtime.keyring, "acme", actor="user:7")
        set_allowlist(session, "acme", ["https://b.example/"], actor="user:7")
        revoke_api_client(session, "acme", actor="user:7")
    with runtime.sessions() as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.target == f"client:{created.client_id}")
            .order_by(AuditEvent.seq)
        ).all()
    assert [e.action for e in events] == [
        "api_client.create",
        "api_client.rotate_token",
        "api_client.rotate_callback_secret",
        "api_client.set_allowlist",
        "api_client.revoke",
    ]
    assert all(e.actor == "user:7" for e in events[1:])
    assert events[1].origin == "10.0.0.1"
    assert events[3].details["before"] == [HOOKS]
    assert events[3].details["after"] == ["https://b.example/"]
    dumped = json.dumps([e.details for e in events])
    for credential in (token, secret, created.token, created.callback_secret):
        assert credential not in dumped


def test_last_use_is_recorded_at_most_once_a_minute(runtime: Runtime) -> None:
    created = new_client(runtime)
    with runtime.sessions() as session:
        assert list_api_clients(session)[0].last_used_at is None
    before = datetime.now(UTC)
    assert api_status(web_process(runtime.settings.data_dir), created.token) == 404
    with runtime.sessions() as session:
        used = list_api_clients(session)[0].last_used_at
    assert used is not None and used >= before - timedelta(seconds=1)
    with transaction(runtime.sessions) as session:
        assert not record_use(session, created.client_id, used + timedelta(seconds=30))
        assert record_use(session, created.client_id, used + timedelta(seconds=61))


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_lifecycle(cli: Cli) -> None:
    cli("init")
    created = json.loads(cli("api-client", "create", "acme", "--callback-allowlist", HOOKS).stdout)
    web = web_process(cli.data_dir)
    assert api_status(web, created["token"]) == 404

    (row,) = cli.json_lines("api-client", "list", "--json")
    assert row["name"] == "acme" and row["state"] == "active"
    assert row["callback_allowlist"] == [HOOKS] and row["last_used_at"] is not None
    assert "token" not in row and "callback_secret" not in row
    assert "acme" in cli("api-client", "list").stdout

    rotated = json.loads(cli("api-client", "rotate-token", "acme").stdout)
    assert api_status(web, created["token"]) == 401
    assert api_status(web, rotated["token"]) == 404

    secret = json.loads(cli("api-client", "rotate-callback-secret", "1").stdout)
    assert secret["name"] == "acme" and len(secret["callback_secret"]) == 64
    runtime = Runtime(load_settings(data_dir=cli.data_dir))
    with runtime.sessions() as session:
        client_row = session.get(ApiClient, created["client_id"])
        assert client_row is not None
        assert callback_secret(client_row, runtime.keyring) == secret["callback_secret"]

    bad = cli("api-client", "set-allowlist", "acme", "ftp://x/", ok=False)
    assert bad.exit_code == 1 and "http(s)" in bad.stderr
    assert cli("api-client", "set-allowlist", "acme", ok=False).exit_code == 2
    saved = json.loads(cli("api-client", "set-allowlist", "acme", "https://b.example/").stdout)
    assert saved["callback_allowlist"] == ["https://b.example/"]

    assert cli("api-client", "revoke", "acme", ok=False).exit_code == 2  # no --yes
    assert api_status(web, rotated["token"]) == 404
    revoked = json.loads(cli("api-client", "revoke", "acme", "--yes").stdout)
    assert revoked["state"] == "revoked"
    assert api_status(web, rotated["token"]) == 401
    again = cli("api-client", "rotate-token", "acme", ok=False)
    assert again.exit_code == 1 and "revoked" in again.stderr
    assert cli("api-client", "revoke", "nobody", "--yes", ok=False).exit_code == 1


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("https://hooks.example.com/cb/../admin", "normal form"),
        ("https://hooks.example.com/cb/%2e%2e/admin", "normal form"),
        ("https://hooks.example.com//cb", "empty segment"),
        ("https://169.254.169.254/latest", "not a public address"),
        ("https://[::ffff:10.0.0.1]/cb", "not a public address"),
        ("https://localhost/cb", "loopback"),
        ("http://hooks.example.com/cb", "https"),
    ],
)
def test_cli_refuses_allowlist_entries_breaking_the_callback_rules(
    cli: Cli, prefix: str, why: str
) -> None:
    """RELIABILITY.md S4-S5 at registration (production settings, the default)."""
    cli("init")
    created = cli("api-client", "create", "acme", "--callback-allowlist", prefix, ok=False)
    assert created.exit_code == 2 and why in created.stderr
    cli("api-client", "create", "acme", "--callback-allowlist", HOOKS)
    refused = cli("api-client", "set-allowlist", "acme", HOOKS, prefix, ok=False)
    assert refused.exit_code == 1 and why in refused.stderr
    (row,) = cli.json_lines("api-client", "list", "--json")
    assert row["callback_allowlist"] == [HOOKS]


def test_cli_accepts_loopback_only_with_the_development_setting(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("init")
    cli("api-client", "create", "acme")
    loopback = "http://127.0.0.1:9000/hooks"
    assert cli("api-client", "set-allowlist", "acme", loopback, ok=False).exit_code == 1
    monkeypatch.setenv("MODERATION_CALLBACK_ALLOW_LOOPBACK", "true")
    saved = json.loads(cli("api-client", "set-allowlist", "acme", loopback).stdout)
    assert saved["callback_allowlist"] == [loopback]
    # Loopback, not private addresses.
    assert cli("api-client", "set-allowlist", "acme", "https://10.0.0.1/", ok=False).exit_code == 1
