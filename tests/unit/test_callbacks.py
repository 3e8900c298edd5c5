"""Signed callbacks: allowlist (no SSRF), signatures, delivery, retries, redelivery, audit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select

from moderation.config import Settings, load_settings
from moderation.service.api_clients import authenticate, callback_secret, create_api_client
from moderation.service.callback_urls import (
    CallbackPolicy,
    callback_policy,
    normalise_allowlist_prefix,
    url_allowed,
)
from moderation.service.callbacks import (
    SIGNATURE_HEADER,
    backoff_seconds,
    deliver_callback,
    notify_decision,
    sign,
    verify_signature,
)
from moderation.service.dispatch import RecordingDispatcher, attach_dispatcher
from moderation.service.platform_client import verify_callback
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import (
    ApiClient,
    AuditEvent,
    CallbackAttempt,
    CallbackDelivery,
    Match,
    Screening,
    Upload,
)
from tests.conftest import loopback_callbacks

ALLOW = ["https://hooks.example.com/moderation", "http://127.0.0.1:8080/"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/moderation", True),
        ("https://hooks.example.com/moderation/in?x=1", True),
        ("https://HOOKS.example.com:443/moderation/a", True),
        ("https://hooks.example.com/moderation-evil", False),
        ("https://hooks.example.com/other", False),
        ("http://hooks.example.com/moderation", False),
        ("https://hooks.example.com:8443/moderation", False),
        ("https://hooks.example.com.evil.example/moderation", False),
        ("https://hooks.example.com@evil.example/moderation", False),
        ("https://user:pw@hooks.example.com/moderation", False),
        ("ftp://hooks.example.com/moderation", False),
        ("http://127.0.0.1:8080/anything", True),
        ("http://127.0.0.1:8081/anything", False),
        ("http://localhost:8080/anything", False),
        ("not a url", False),
    ],
)
def test_url_allowed(url: str, allowed: bool) -> None:
    assert url_allowed(url, ALLOW, CallbackPolicy(allow_loopback=True)) is allowed
    if url.startswith("http://127.0.0.1"):
        assert not url_allowed(url, ALLOW)  # production refuses loopback and plain http


@pytest.mark.parametrize(
    "prefix", ["ftp://x/", "https://", "https://a@b/", "https://h/p?q=1", "https://h/#f"]
)
def test_bad_allowlist_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        normalise_allowlist_prefix(prefix)


def test_signature_round_trip_and_tamper() -> None:
    secret, body, now = "ab" * 32, b'{"decision":"block"}', 1_800_000_000
    header = sign(secret, now, body)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature(secret, header, body, now=now + 10)
    assert not verify_signature(secret, header, body + b" ", now=now)
    assert not verify_signature("cd" * 32, header, body, now=now)
    assert not verify_signature(secret, header, body, now=now + 301)  # replayed later
    assert not verify_signature(secret, "v1=" + header.split("v1=")[1], body, now=now)
    # Two v1 values (secret change): either one may match.
    both = f"{header},v1={'0' * 64}"
    assert verify_signature(secret, both, body, now=now)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(a, 2.0) for a in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_seconds(40, 2.0) == 3600.0


class Receiver:
    """A local HTTP server recording callbacks; answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The receivers listen on 127.0.0.1: the development loopback setting."""
    return loopback_callbacks(settings)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500, 503])
    yield server
    server.close()


def _setup(runtime: Runtime, url: str, allowlist: list[str]) -> tuple[str, str, str]:
    with transaction(runtime.sessions) as session:
        client = create_api_client(
            session,
            runtime.keyring,
            "acme",
            callback_allowlist=allowlist,
            policy=callback_policy(runtime.settings),
        )
        upload = Upload(client_id=client.client_id, callback_url=url, status="done", source="api")
        session.add(upload)
        session.flush()
        notify_decision(session, upload.id)
        delivery_id = session.scalar(select(CallbackDelivery.id))
    assert delivery_id is not None
    return delivery_id, client.callback_secret, client.token


def _count(runtime: Runtime, model: Any, *where: Any) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_delivery_retries_then_succeeds_once(runtime: Runtime, receiver: Receiver) -> None:
    delivery_id, secret, token = _setup(runtime, receiver.url, [receiver.url])
    fast = Runtime(
        load_settings(
            data_dir=runtime.settings.data_dir, callback_backoff=0.01, callback_allow_loopback=True
        )
    )
    first = deliver_callback(fast, delivery_id)
    assert first.state == "retry" and first.status_code == 500 and first.retry_in == 0.01
    time.sleep(0.05)
    assert deliver_callback(fast, delivery_id).state == "retry"
    time.sleep(0.05)
    done = deliver_callback(fast, delivery_id)
    assert done.state == "delivered" and done.attempt == 3
    # A redelivered task has no side effect.
    assert deliver_callback(fast, delivery_id).state == "skipped"
    assert len(receiver.received) == 3
    assert _count(runtime, CallbackAttempt) == 3
    assert _count(runtime, AuditEvent, AuditEvent.action == "callback.deliver") == 1
    headers, body = receiver.received[-1]
    assert verify_callback(secret, headers[SIGNATURE_HEADER], body)
    payload = json.loads(body)
    assert payload["delivery_id"] == delivery_id and payload["event"] == "screening.decided"
    # The stored secret is encrypted, and the token only hashed.
    with runtime.sessions() as session:
        client = session.scalar(select(ApiClient))
        assert client is not None
        assert secret.encode() not in client.callback_secret
        assert bytes.fromhex(secret) not in client.callback_secret
        assert token not in client.token_hash
        assert callback_secret(client, runtime.keyring) == secret
        assert authenticate(session, token) is not None
        assert authenticate(session, token + "x") is None


def test_delivery_gives_up_after_max_attempts(runtime: Runtime, receiver: Receiver) -> None:
    delivery_id, _, _ = _setup(runtime, receiver.url, [receiver.url])
    tight = Runtime(
        load_settings(
            data_dir=runtime.settings.data_dir,
            callback_backoff=0.01,
            callback_max_attempts=2,
            callback_allow_loopback=True,
        )
    )
    assert deliver_callback(tight, delivery_id).state == "retry"
    time.sleep(0.05)
    assert deliver_callback(tight, delivery_id).state == "failed"
    assert deliver_callback(tight, delivery_id).state == "skipped"
    with runtime.sessions() as session:
        audit = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "callback.deliver")
        ).all()
    assert [e.outcome for e in audit] == ["failure"]


def test_delivery_refused_off_allowlist(runtime: Runtime, receiver: Receiver) -> None:
    # The allowlist changed after the upload: the URL is re-checked at delivery.
    delivery_id, _, _ = _setup(runtime, receiver.url, ["https://elsewhere.example/"])
    assert deliver_callback(runtime, delivery_id).state == "refused"
    assert receiver.received == []
    with runtime.sessions() as session:
        audit = session.scalar(select(AuditEvent).where(AuditEvent.action == "callback.deliver"))
        assert audit is not None and audit.outcome == "denied"


def test_claimed_delivery_is_not_sent_twice(runtime: Runtime, receiver: Receiver) -> None:
    delivery_id, _, _ = _setup(runtime, receiver.url, [receiver.url])
    assert deliver_callback(runtime, delivery_id).state == "retry"  # backoff 2 s by default
    assert deliver_callback(runtime, delivery_id).state == "not_due"
    assert len(receiver.received) == 1


def test_notify_sends_only_after_commit(runtime: Runtime) -> None:
    recording = RecordingDispatcher()
    attach_dispatcher(runtime.sessions, recording)
    with transaction(runtime.sessions) as session:
        client = create_api_client(
            session, runtime.keyring, "acme", callback_allowlist=["https://h.example/"]
        )
        upload = Upload(client_id=client.client_id, callback_url="https://h.example/x")
        plain = Upload(client_id=client.client_id)  # no callback URL: a no-op
        session.add_all([upload, plain])
        session.flush()
        upload_id = upload.id
    with pytest.raises(RuntimeError), transaction(runtime.sessions) as session:
        notify_decision(session, upload_id)
        raise RuntimeError("rolled back")
    assert recording.callbacks == []
    with transaction(runtime.sessions) as session:
        notify_decision(session, upload_id)
        notify_decision(session, plain.id)
        assert recording.callbacks == []  # not before the commit
    assert len(recording.callbacks) == 1
    assert _count(runtime, CallbackDelivery) == 1


def test_stored_callback_keeps_no_label_and_the_sent_body_has_it(runtime: Runtime) -> None:
    from moderation.banks.records import create_bank
    from moderation.banks.sealed_fields import new_entry

    server = Receiver([])
    try:
        with transaction(runtime.sessions) as session:
            bank = create_bank(session, "known")
            entry = new_entry(session, runtime.keyring, bank_id=bank.id, label="label-QX81")
            policy = callback_policy(runtime.settings)
            client = create_api_client(
                session, runtime.keyring, "acme", callback_allowlist=[server.url], policy=policy
            )
            upload = Upload(
                client_id=client.client_id, callback_url=server.url, status="done", source="api"
            )
            session.add(upload)
            session.flush()
            screening = Screening(upload_id=upload.id, decision="block", policy="default")
            session.add(screening)
            session.flush()
            session.add(
                Match(screening_id=screening.id, entry_id=entry.id, bank_id=bank.id, cosine=0.99)
            )
            session.flush()
            notify_decision(session, upload.id)
        with runtime.sessions() as session:
            delivery = session.scalar(select(CallbackDelivery))
            assert delivery is not None and "QX81" not in json.dumps(delivery.payload)
            delivery_id = delivery.id
        assert deliver_callback(runtime, delivery_id).state == "delivered"
        ((_, body),) = server.received
        assert json.loads(body)["result"]["matches"][0]["label"] == "label-QX81"
    finally:
        server.close()
