"""Helpers for the queue's integration tests: a private Redis, a callback receiver, and a service
stack made of real ``moderation serve`` / ``worker`` / ``beat`` processes over a real database.

Not a conftest (a second ``conftest`` module would shadow ``tests/conftest.py`` for the tests
that import from it): each test module wraps these in its own small fixtures.

Every process runs from this checkout (``PYTHONPATH``) with its own data dir; Redis runs on a
spare port started here, so tests can stop and restart it (RELIABILITY.md Q4).
"""

from __future__ import annotations

import base64
import contextlib
import io
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from moderation.benchmark.processes import REPO as REPO  # re-exported for the test modules
from moderation.benchmark.processes import (
    RedisServer,
    Service,
    child_env,
    free_port,
    wait_for,
)
from moderation.config import Settings, load_settings
from tests.conftest import SKIMAGE_PHOTOS, skimage_photo

BANK_PHOTOS = ("astronaut", "chelsea", "coffee")
METRICS_TOKEN = "queue-stack-metrics-0123456789abcdefghijklmnop"


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5
) -> Any:
    """Poll ``condition`` until truthy; fail (AssertionError) with ``what`` after ``timeout`` s."""
    try:
        return wait_for(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def bank_images() -> dict[str, bytes]:
    """The banned photos (256 px)."""
    out = {}
    for name in BANK_PHOTOS:
        image = skimage_photo(name)
        image.thumbnail((256, 256))
        out[name] = jpeg_bytes(image)
    return out


def upload_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct small JPEGs: random crops of scikit-image's photos, 96-128 px."""
    rng = np.random.default_rng(seed)
    photos = [skimage_photo(name) for name in SKIMAGE_PHOTOS]
    images = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        crop.thumbnail((int(rng.integers(96, 129)),) * 2)
        images.append(jpeg_bytes(crop, quality=int(rng.integers(70, 95))))
    return images


# --- callback receiver ---------------------------------------------------------------------


class CallbackReceiver:
    """A local HTTP server recording every callback (headers, raw body) and the paths POSTed
    to."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.append((dict(self.headers), body))
                    receiver.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the service stack ---------------------------------------------------------------------


def wait_live(service: Service, base_url: str, timeout: float = 120) -> None:
    """Wait until ``service`` (a ``moderation serve``) answers ``/status/live`` at ``base_url``;
    fail at once, with its log, if it dies."""

    def live() -> bool:
        if not service.alive():
            raise AssertionError(f"{service.name} died:\n{service.output()[-3000:]}")
        try:
            return requests.get(f"{base_url}/status/live", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(live, timeout, f"{service.name} to answer /status/live")


class Stack:
    """Settings, database and processes of one deployment under ``tmp_path``."""

    def __init__(
        self, tmp_path: Path, *, database_url: str | None, broker_url: str | None, **env: Any
    ) -> None:
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "master_keys": f"test-k1:{key}",
            "torch_threads": 1,
            "task_time_limit": 20,
            "visibility_timeout": 30,
            "reconcile_after": 30,
            "reconcile_interval": 5,
            "snapshot_poll_interval": 1.0,
            "max_attempts": 3,
            "callback_backoff": 0.5,
            "log_level": "INFO",
            "api_rate_limit": "100000/minute",
            # The console in the same app refuses to start in production without one.
            "secret_key": "queue-stack-secret-0123456789abcdefghijklmnopqrstuvwxyz",
            # /metrics and the detailed /status answer only to this bearer token.
            "metrics_token": METRICS_TOKEN,
            # The callback receiver listens on plain http at 127.0.0.1: the development setting.
            "callback_allow_loopback": True,
        }
        if database_url:
            self.values["database_url"] = database_url
        if broker_url:
            self.values["broker_url"] = broker_url
        self.values.update(env)
        self.tmp_path = tmp_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.services: list[Service] = []
        self.runtime: Any = None

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(**{**self.values, **overrides})

    def env(self, **overrides: Any) -> dict[str, str]:
        return child_env({**self.values, **overrides}, OMP_NUM_THREADS="1")

    def init(self, bank: dict[str, bytes] | None = None) -> Any:
        """Schema, and a block bank of ``bank`` images (default: the three bank photos)."""
        from moderation.banks.operations import import_bank
        from moderation.banks.records import create_bank
        from moderation.service.runtime import Runtime
        from moderation.storage.db import migrate, transaction

        settings = self.settings()
        settings.ensure_dirs()
        self.runtime = Runtime(settings)
        migrate(self.runtime.engine)
        bank_dir = self.tmp_path / "bank"
        bank_dir.mkdir(exist_ok=True)
        for name, data in (bank if bank is not None else bank_images()).items():
            (bank_dir / f"{name}.jpg").write_bytes(data)
        with transaction(self.runtime.sessions) as session:
            create_bank(session, "known-bad")
        import_bank(self.runtime, "known-bad", [bank_dir], actor="test")
        return self.runtime

    def create_client(self, allowlist: list[str]) -> Any:
        from moderation.service.api_clients import create_api_client
        from moderation.service.callback_urls import callback_policy
        from moderation.storage.db import transaction

        with transaction(self.runtime.sessions) as session:
            return create_api_client(
                session,
                self.runtime.keyring,
                f"client-{len(self.services)}-{time.time()}",
                callback_allowlist=allowlist,
                policy=callback_policy(self.runtime.settings),
            )

    def create_user(self, email: str, role: str, password: str) -> None:
        """A console user in this stack's database (TOTP only where the role demands it)."""
        from moderation.governance.users import create_user
        from moderation.storage.db import transaction

        with transaction(self.runtime.sessions) as session:
            create_user(
                session,
                self.runtime.keyring,
                email=email,
                role=role,
                password=password,
                actor="test",
            )

    def start(
        self, name: str, *args: str, raw_env: dict[str, str] | None = None, **env: Any
    ) -> Service:
        log = self.tmp_path / f"{name}-{len(self.services)}.log"
        full_env = {**self.env(**env), **(raw_env or {})}
        service = Service.moderation(name, list(args), full_env, log)
        self.services.append(service)
        return service

    def start_web(self) -> Service:
        return self.start("web", "serve", "--port", str(self.port), "--workers", "2")

    def start_worker(
        self, concurrency: int = 1, raw_env: dict[str, str] | None = None, **env: Any
    ) -> Service:
        return self.start(
            "worker", "worker", "--concurrency", str(concurrency), raw_env=raw_env, **env
        )

    def start_beat(self) -> Service:
        return self.start("beat", "beat")

    def start_all(self, allowlist: list[str], *, concurrency: int = 1) -> tuple[Any, Service]:
        """Schema and bank, one API client, then web, worker and beat, ready; returns the
        client and the worker."""
        self.init()
        client = self.create_client(allowlist)
        self.start_web()
        worker = self.start_worker(concurrency=concurrency)
        self.start_beat()
        self.wait_ready()
        return client, worker

    def status(self) -> tuple[int, dict[str, Any]]:
        try:
            response = self.get_private("/status")
            return response.status_code, response.json()
        except (requests.RequestException, ValueError):
            return 0, {}

    def get_private(self, path: str) -> requests.Response:
        """GET a token-protected path (``/metrics``, ``/status``) with the metrics token."""
        return requests.get(
            f"{self.base_url}{path}",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=10,
        )

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            for service in self.services:
                if not service.alive() and service.name == "web":
                    raise AssertionError(f"web died:\n{service.output()[-3000:]}")
            code, body = self.status()
            return body if code == 200 else None

        try:
            return dict(wait_until(ready, timeout, "/status to answer 200"))
        except AssertionError:
            for service in self.services:
                print(f"--- {service.name} log ---\n{service.output()[-4000:]}")
            raise

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.runtime is not None:
            self.runtime.engine.dispose()


# --- context managers the test modules wrap in fixtures -----------------------------------


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A private Redis for one test (skips, saying why, without redis-server)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/services.sh expects it)")
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop_without_saving()


@contextlib.contextmanager
def running_receiver() -> Iterator[CallbackReceiver]:
    """A callback receiver for one test."""
    server = CallbackReceiver()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Makes stacks under ``tmp_path`` and stops all their processes at the end."""
    stacks: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", **kwargs)
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.close()
