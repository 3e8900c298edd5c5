"""Connect-time address checks of callback deliveries (RELIABILITY.md S5): the resolved address
is checked and connected to, so neither ``localhost`` nor a rebinding DNS answer reaches a
loopback, private or metadata address. Real sockets and a real local receiver throughout; only
the DNS answers of a rebinding name come from a stub resolver."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
from sqlalchemy import select

from moderation.config import load_settings
from moderation.service import callback_http
from moderation.service.api_clients import create_api_client
from moderation.service.callback_http import (
    ForbiddenAddressError,
    checked_addresses,
    guarded_session,
)
from moderation.service.callback_urls import PRODUCTION, CallbackPolicy, callback_policy
from moderation.service.callbacks import deliver_callback, notify_decision
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, CallbackAttempt, CallbackDelivery, Upload
from tests.integration.queue_stack import CallbackReceiver

LOOPBACK = CallbackPolicy(require_https=True, allow_loopback=True)


def _port(receiver: CallbackReceiver) -> int:
    return int(receiver.server.server_address[1])


def _stub(answers: dict[str, list[list[str]]], calls: list[str]) -> Callable[[str, int], list[str]]:
    """A resolver answering each name's lists in turn (the last one repeats), recording calls."""

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        queue = answers[host]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return resolver


def test_localhost_is_refused_at_connect_time(receiver: CallbackReceiver) -> None:
    url = f"http://localhost:{_port(receiver)}/hooks"
    with (
        pytest.raises(ForbiddenAddressError, match=r"127\.0\.0\.1|::1"),
        guarded_session(PRODUCTION) as http,
    ):
        http.post(url, data=b"{}", timeout=10, allow_redirects=False)
    assert receiver.received == []
    # The same session machinery reaches it when loopback is allowed: the refusal above is the
    # address check, not a broken connection.
    with guarded_session(LOOPBACK) as http:
        assert http.post(url, data=b"{}", timeout=10).status_code == 204
    assert len(receiver.received) == 1


def test_https_connections_are_checked_too() -> None:
    with pytest.raises(ForbiddenAddressError), guarded_session(PRODUCTION) as http:
        http.post("https://localhost:9/hooks", data=b"{}", timeout=10)
    with pytest.raises(ForbiddenAddressError), guarded_session(PRODUCTION) as http:
        http.get("https://[::ffff:169.254.169.254]/latest/meta-data", timeout=10)


def test_rebinding_name_is_refused_on_its_delivery_time_answer(
    receiver: CallbackReceiver,
) -> None:
    calls: list[str] = []
    resolver = _stub({"rebind.example": [["127.0.0.1"]]}, calls)
    url = f"http://rebind.example:{_port(receiver)}/hooks"
    with pytest.raises(ForbiddenAddressError), guarded_session(PRODUCTION, resolver) as http:
        http.post(url, data=b"{}", timeout=10)
    assert receiver.received == [] and calls == ["rebind.example"]


def test_connects_to_the_checked_address_keeping_the_host_name(
    receiver: CallbackReceiver,
) -> None:
    # The first answer is checked and used; a second lookup (which would answer a private
    # address) never happens: one resolution per connection.
    calls: list[str] = []
    resolver = _stub({"hooks.test": [["127.0.0.1"], ["10.0.0.1"]]}, calls)
    port = _port(receiver)
    with guarded_session(LOOPBACK, resolver) as http:
        response = http.post(f"http://hooks.test:{port}/hooks", data=b"{}", timeout=10)
    assert response.status_code == 204
    assert calls == ["hooks.test"]
    ((headers, _),) = receiver.received
    assert headers["Host"] == f"hooks.test:{port}"


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.216.34", "10.0.0.1"],  # one private answer among public ones
        ["::ffff:169.254.169.254"],
        ["0.0.0.0"],
        ["fe80::1%1"],
        [],
    ],
)
def test_any_refused_answer_refuses_the_name(answer: list[str]) -> None:
    with pytest.raises(ForbiddenAddressError):
        checked_addresses("h.example", 443, LOOPBACK, lambda host, port: list(answer))


def test_unresolvable_name_is_a_connection_error_not_a_refusal() -> None:
    with pytest.raises(requests.ConnectionError), guarded_session(PRODUCTION) as http:
        http.post("https://does-not-exist.invalid/hooks", data=b"{}", timeout=10)


def test_delivery_to_a_rebinding_name_is_refused_and_audited(
    runtime: Runtime, receiver: CallbackReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Development (plain http allowed), loopback not allowed: the URL passes every check at
    # submission; its name resolves to 127.0.0.1 only when the delivery connects.
    dev = Runtime(load_settings(data_dir=runtime.settings.data_dir, environment="development"))
    url = f"http://rebind.example:{_port(receiver)}/hooks"
    calls: list[str] = []
    monkeypatch.setattr(callback_http, "resolve", _stub({"rebind.example": [["127.0.0.1"]]}, calls))
    with transaction(dev.sessions) as session:
        client = create_api_client(
            session,
            dev.keyring,
            "acme",
            callback_allowlist=[url],
            policy=callback_policy(dev.settings),
        )
        upload = Upload(client_id=client.client_id, callback_url=url, status="done", source="api")
        session.add(upload)
        session.flush()
        notify_decision(session, upload.id)
    with dev.sessions() as session:
        delivery_id = session.scalar(select(CallbackDelivery.id))
    assert delivery_id is not None
    assert deliver_callback(dev, delivery_id).state == "refused"
    assert deliver_callback(dev, delivery_id).state == "skipped"  # never retried
    assert receiver.received == [] and calls == ["rebind.example"]
    with dev.sessions() as session:
        attempt = session.scalar(select(CallbackAttempt))
        audit = session.scalar(select(AuditEvent).where(AuditEvent.action == "callback.deliver"))
        delivery = session.get(CallbackDelivery, delivery_id)
    assert attempt is not None and not attempt.delivered
    assert attempt.error is not None and "127.0.0.1" in attempt.error
    assert audit is not None and audit.outcome == "denied"
    assert audit.details["reason"] == "forbidden_address"
    assert delivery is not None and delivery.state == "failed"
