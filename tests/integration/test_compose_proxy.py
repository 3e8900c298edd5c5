"""The compose deployment's proxy for real: Debian's Caddy with ``deploy/Caddyfile`` (the file
docker-compose.yml mounts) in front of a real ``moderation serve`` in production mode, trusting
exactly one proxy as compose sets it (issue 16 item 5).

Shows the console usable behind TLS termination (HTTPS with Caddy's internal CA, Secure cookies,
a real login), HTTP redirected to HTTPS, the upload API through the proxy, and a client's forged
X-Forwarded-For replaced by the address Caddy saw.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from moderation.storage.models import AuditEvent
from tests.integration.queue_stack import (
    REPO,
    Stack,
    free_port,
    running_redis,
    stack_factory,
    upload_images,
    wait_until,
)

CADDYFILE = REPO / "deploy" / "Caddyfile"
PASSWORD = "proxy-test-password-0123456789"
FORGED = "203.0.113.9"


class Caddy:
    """``caddy run`` of the repository's Caddyfile with a private data dir and spare ports."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        self.http_port, self.https_port = free_port(), free_port()
        self.data = workdir / "caddy-data"
        self.log = workdir / "caddy.log"
        env = {
            **os.environ,
            "HOME": str(workdir),
            "XDG_DATA_HOME": str(self.data),
            "XDG_CONFIG_HOME": str(workdir / "caddy-config"),
            "MODERATION_HTTP_PORT": str(self.http_port),
            "MODERATION_HTTPS_PORT": str(self.https_port),
            "MODERATION_SITE_ADDRESS": "localhost",
            "MODERATION_TLS": "internal",
            "MODERATION_UPSTREAM": upstream,
        }
        binary = shutil.which("caddy")
        assert binary is not None
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def root_certificate(self) -> Path:
        return self.data / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            if not self.root_certificate.exists():
                return False
            try:
                response = requests.get(
                    f"{self.url}/status/live", verify=self.root_certificate, timeout=5
                )
            except requests.RequestException:
                return False
            return response.status_code == 200

        wait_until(ready, 60, "Caddy to serve /status/live over HTTPS")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Caddy]]:
    if shutil.which("caddy") is None:
        pytest.skip("caddy is not installed: run scripts/compose.sh (make test does)")
    tmp_path = tmp_path_factory.mktemp("proxy")
    with running_redis(tmp_path) as redis_server, stack_factory(tmp_path) as make:
        # As docker-compose.yml's web: production, exactly one trusted proxy.
        stack = make(database_url=None, broker_url=redis_server.url, console_trusted_proxies=1)
        stack.init()
        stack.create_user("reviewer@example.org", "reviewer", PASSWORD)
        stack.start_web()
        caddy = Caddy(tmp_path, f"127.0.0.1:{stack.port}")
        try:
            caddy.wait_ready()
            yield stack, caddy
        finally:
            caddy.stop()


def test_console_login_works_over_the_proxy_with_secure_cookies(
    proxied: tuple[Stack, Caddy],
) -> None:
    stack, caddy = proxied
    # Straight to gunicorn in production the console refuses plain HTTP (redirects to https).
    direct = requests.get(f"{stack.base_url}/login", allow_redirects=False, timeout=10)
    assert direct.status_code in (301, 302, 308), direct.status_code
    assert direct.headers["Location"].startswith("https://")

    browser = requests.Session()
    browser.trust_env = False  # else REQUESTS_CA_BUNDLE overrides the session's CA
    browser.verify = str(caddy.root_certificate)
    page = browser.get(f"{caddy.url}/login", timeout=10)
    assert page.status_code == 200
    assert "max-age=" in page.headers["Strict-Transport-Security"]
    cookies = page.headers.get("Set-Cookie", "")
    assert "Secure" in cookies and "HttpOnly" in cookies, cookies
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert token is not None, page.text[:2000]
    answer = browser.post(
        f"{caddy.url}/login",
        data={
            "csrf_token": token.group(1),
            "email": "reviewer@example.org",
            "password": PASSWORD,
            "next": "",
        },
        headers={"X-Forwarded-For": FORGED, "Referer": f"{caddy.url}/login"},
        allow_redirects=False,
        timeout=30,
    )
    assert answer.status_code == 302, answer.text[:2000]
    assert answer.headers["Location"].startswith(("/", caddy.url))
    queue = browser.get(f"{caddy.url}/review", timeout=30)
    assert queue.status_code == 200
    assert "reviewer@example.org" in queue.text

    with stack.runtime.sessions() as session:
        login = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login")).one()
    # Caddy replaced the client's forged header with the address it saw.
    assert login.origin is not None and FORGED not in login.origin
    assert login.origin in ("127.0.0.1", "::1"), login.origin


def test_plain_http_is_redirected_to_https(proxied: tuple[Stack, Caddy]) -> None:
    _, caddy = proxied
    response = requests.get(
        f"http://localhost:{caddy.http_port}/login", allow_redirects=False, timeout=10
    )
    assert response.status_code in (301, 302, 308)
    # The site address has no port, so the redirect names HTTPS's default one (443 in compose).
    assert response.headers["Location"] == "https://localhost/login"


def test_uploads_are_accepted_through_the_proxy(proxied: tuple[Stack, Caddy]) -> None:
    stack, caddy = proxied
    client = stack.create_client([])
    image = upload_images(1, seed=3)[0]
    response = requests.post(
        f"{caddy.url}/api/v1/screenings",
        headers={"Authorization": f"Bearer {client.token}"},
        data={"external_id": "via-proxy", "subject_id": "subject-1"},
        files={"image": ("photo.jpg", image, "image/jpeg")},
        verify=str(caddy.root_certificate),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("queued", "processing")
