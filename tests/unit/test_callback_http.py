"""Connect-time address checks of callback deliveries (RELIABILITY.md S5): the resolved address
is checked and connected to, so neither ``localhost`` nor a rebinding DNS answer reaches a
loopback, private or metadata address. Real sockets and a real local receiver throughout; only
the DNS answers of a rebinding name come from a stub resolver."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


class TlsReceiver:
    """A local HTTPS server with a self-signed certificate for ``name``; records the SNI names
    and ``Host`` headers it gets."""

    def __init__(self, directory: Path, name: str) -> None:
        self.cert = directory / "cert.pem"
        key_path = directory / "key.pem"
        _self_signed(name, self.cert, key_path)
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.hosts.append(self.headers["Host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key_path)
        context.sni_callback = lambda _sock, server_name, _ctx: receiver.sni.append(server_name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _self_signed(name: str, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[TlsReceiver]:
    server = TlsReceiver(tmp_path, "hooks.test")
    yield server
    server.close()


def test_https_keeps_the_name_for_sni_and_certificate_checks(tls_receiver: TlsReceiver) -> None:
    """The socket goes to the checked address; TLS still names the host (SNI) and verifies the
    certificate against the name, not the address."""
    resolver = _stub({"hooks.test": [["127.0.0.1"]], "other.test": [["127.0.0.1"]]}, [])
    port = tls_receiver.port
    with guarded_session(LOOPBACK, resolver) as http:
        response = http.post(
            f"https://hooks.test:{port}/hooks",
            data=b"{}",
            timeout=10,
            verify=str(tls_receiver.cert),
        )
        assert response.status_code == 204
        assert tls_receiver.sni == ["hooks.test"]
        assert tls_receiver.hosts == [f"hooks.test:{port}"]
        # Same address, another name: the certificate does not match it.
        with pytest.raises(requests.exceptions.SSLError):
            http.post(
                f"https://other.test:{port}/hooks",
                data=b"{}",
                timeout=10,
                verify=str(tls_receiver.cert),
            )
    assert tls_receiver.hosts == [f"hooks.test:{port}"]


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
