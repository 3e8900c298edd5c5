"""RELIABILITY.md S8-S12 over real HTTP against ``moderation serve`` (gunicorn), in production
mode behind one trusted TLS proxy (the test sends the proxy's ``X-Forwarded-Proto: https``):

- S8: an anonymous console POST declaring a large body is answered 413 before the body is sent;
- S9: out-of-range integers in console and API paths and query strings: 404 or 400, never 500;
- S10: a ``Host`` of another site gets 400, never a redirect to it;
- S11: logout by GET, or by POST without the CSRF token, leaves the session signed in;
- S12: a review page whose external id and match label carry bidi controls shows them as marks.

The Flask-test-client details are in ``tests/unit/console/test_console_request_hardening.py``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from admin.hardening import BIDI_CONTROLS
from moderation.service.api_clients import create_api_client
from moderation.service.runtime import Runtime
from moderation.storage.db import migrate, transaction
from tests.integration.queue_stack import Stack, stack_factory, wait_until
from tests.unit.console.conftest import PASSWORD, build_review_item, csrf_from

HUGE = "9" * 30
RLO = "\u202e"
PROXY = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "127.0.0.1"}


class Console:
    """A browser behind the TLS proxy: cookies, same-origin Referer and CSRF tokens."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = requests.Session()
        self.http.headers.update(PROXY)
        self.http.headers["Referer"] = base_url.replace("http://", "https://", 1) + "/"

    def _cookies(self) -> dict[str, str]:
        # The session cookie is Secure, which requests keeps from http URLs; the test plays
        # the TLS proxy, so it sends the cookie itself.
        return {"Cookie": "; ".join(f"{c.name}={c.value}" for c in self.http.cookies)}

    def get(self, path: str) -> requests.Response:
        return self.http.get(
            self.base_url + path, headers=self._cookies(), allow_redirects=False, timeout=60
        )

    def post(self, path: str, data: dict[str, str] | None = None) -> requests.Response:
        return self.http.post(
            self.base_url + path,
            data=data,
            headers=self._cookies(),
            allow_redirects=False,
            timeout=60,
        )

    def token(self, path: str) -> str:
        page = self.get(path)
        assert page.status_code == 200, (path, page.status_code)
        return csrf_from(page.text)

    def login(self, email: str) -> None:
        data = {"email": email, "password": PASSWORD, "csrf_token": self.token("/login")}
        response = self.post("/login", data=data)
        assert response.status_code == 302, response.text[:500]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``moderation serve`` in production, trusting one proxy and the hosts console.example
    and 127.0.0.1, over a migrated SQLite database with a reviewer and an API client."""
    with stack_factory(tmp_path_factory.mktemp("abuse")) as make:
        stack = make(
            database_url=None,
            broker_url=None,
            trusted_hosts="console.example,127.0.0.1",
            console_trusted_proxies=1,
            console_login_rate_limit="1000 per minute",
        )
        settings = stack.settings()
        settings.ensure_dirs()
        stack.runtime = Runtime(settings)
        migrate(stack.runtime.engine)
        stack.start("web", "serve", "--port", str(stack.port), "--workers", "1")
        wait_until(_live(stack), 180, "moderation serve to answer /status/live")
        yield stack


def _live(stack: Stack) -> Any:
    def check() -> bool:
        assert stack.services[0].alive(), stack.services[0].output()[-3000:]
        try:
            return requests.get(f"{stack.base_url}/status/live", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    return check


@pytest.fixture(scope="module")
def reviewer(served: Stack) -> str:
    served.create_user("rev@example.org", "reviewer", PASSWORD)
    return "rev@example.org"


def _raw_request(port: int, head: str, timeout: float = 60) -> bytes:
    """Send ``head`` (request line and headers, no body) and read until the server closes or
    the headers of its answer are in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_s8_anonymous_large_body_is_refused_before_it_is_sent(served: Stack) -> None:
    head = (
        "POST /login HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{served.port}\r\n"
        "X-Forwarded-Proto: https\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {100 * 1024 * 1024}\r\n"
        "\r\n"
    )
    # No byte of the 100 MiB is sent: the answer can only come from the declared length.
    answer = _raw_request(served.port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_s9_out_of_range_integers_are_404_or_400(served: Stack, reviewer: str) -> None:
    console = Console(served.base_url)
    console.login(reviewer)
    assert console.get(f"/review/{HUGE}").status_code == 404
    assert console.get(f"/review/{HUGE}/image").status_code == 404
    assert console.get(f"/review?client={HUGE}").status_code == 400
    assert console.get("/review?client=-1").status_code == 400
    token = console.token("/review")
    claim = console.post(
        "/review/claim", data={"queue": "main", "client": HUGE, "csrf_token": token}
    )
    assert claim.status_code == 400
    with transaction(served.runtime.sessions) as db:
        client = create_api_client(db, served.runtime.keyring, "abuse", callback_allowlist=[])
    bearer = {"Authorization": f"Bearer {client.token}"}
    for path in (f"/api/v1/screenings/{HUGE}", f"/api/v1/screenings/-{HUGE}"):
        response = requests.get(served.base_url + path, headers=bearer, timeout=60)
        assert response.status_code == 404, (path, response.status_code)
    wait = requests.get(
        f"{served.base_url}/api/v1/screenings/{HUGE}?wait=1e400", headers=bearer, timeout=60
    )
    assert wait.status_code == 404


def test_s10_foreign_host_is_400_never_a_redirect(served: Stack) -> None:
    url = f"{served.base_url}/login"
    evil = requests.get(url, headers={"Host": "evil.example"}, allow_redirects=False, timeout=60)
    assert evil.status_code == 400 and "Location" not in evil.headers
    forwarded = requests.get(
        url,
        headers={**PROXY, "X-Forwarded-Host": "evil.example"},
        allow_redirects=False,
        timeout=60,
    )
    assert forwarded.status_code == 400 and "Location" not in forwarded.headers
    # The configured host is served (plain HTTP from a browser is sent to HTTPS on it).
    ours = requests.get(url, headers={"Host": "console.example"}, allow_redirects=False, timeout=60)
    assert ours.status_code == 302
    assert ours.headers["Location"] == "https://console.example/login"
    assert requests.get(url, headers=PROXY, timeout=60).status_code == 200


def test_s11_logout_needs_a_csrf_protected_post(served: Stack, reviewer: str) -> None:
    console = Console(served.base_url)
    console.login(reviewer)
    # Another site's link or image (GET), or its form (POST without our token): refused.
    assert console.get("/logout").status_code == 405
    assert console.post("/logout").status_code == 400
    assert console.get("/account").status_code == 200  # still signed in
    token = console.token("/account")
    assert console.post("/logout", data={"csrf_token": token}).status_code == 302
    assert console.get("/account").status_code == 302  # signed out


def test_s12_bidi_controls_in_a_review_page_are_shown_as_marks(
    served: Stack, reviewer: str
) -> None:
    item = build_review_item(
        served.runtime, external_id=f"invoice{RLO}gpj.exe", label=f"label\u2067{RLO}\u2069"
    )
    console = Console(served.base_url)
    console.login(reviewer)
    token = console.token("/review")
    claim = console.post("/review/claim", data={"queue": "main", "csrf_token": token})
    assert claim.status_code == 302
    page = console.get(f"/review/{item}")
    assert page.status_code == 200
    assert not BIDI_CONTROLS & set(page.text)
    assert re.search(r'id="external-id">invoice\[U\+202E\]gpj\.exe<', page.text)
    assert "label[U+2067][U+202E][U+2069]" in page.text


def test_web_stayed_healthy(served: Stack) -> None:
    assert requests.get(f"{served.base_url}/status/live", timeout=1).status_code == 200
    # No request above reached an unhandled exception (a 500 logs its traceback).
    assert "Traceback" not in served.services[0].output()
