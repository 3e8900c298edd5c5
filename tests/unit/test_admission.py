"""admin.admission: at most N requests in the app per process, probes never queue, long polls
give their slot back, bodies are read before a slot is taken (README "Serving model")."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from admin.admission import RequestAdmission


class SlowApp:
    """A WSGI app that records how many requests are inside it at once."""

    def __init__(self, hold: float = 0.2, inside: Callable[[], None] | None = None) -> None:
        self.hold = hold
        self.inside = inside
        self.current = 0
        self.peak = 0
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.bodies.append(environ["wsgi.input"].read(length) if length else b"")
            if self.inside is not None:
                self.inside()
            if not environ["PATH_INFO"].startswith("/status/"):
                time.sleep(self.hold)
        finally:
            with self.lock:
                self.current -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def call(app: Any, path: str = "/api/v1/screenings", body: bytes = b"") -> bytes:
    environ = {
        "PATH_INFO": path,
        "REQUEST_METHOD": "POST" if body else "GET",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "HTTP_AUTHORIZATION": "Bearer mod_test",
        "wsgi.input": io.BytesIO(body),
    }
    result = app(environ, lambda status, headers: None)
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def run_concurrently(count: int, target: Callable[[], Any]) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


def test_at_most_limit_requests_are_in_the_app_at_once() -> None:
    inner = SlowApp()
    app = RequestAdmission(inner, limit=3, spool_limit=1024)
    run_concurrently(10, lambda: call(app))
    assert inner.peak == 3
    assert inner.current == 0
    # Every slot came back: three more enter at once again.
    run_concurrently(3, lambda: call(app))
    assert inner.peak == 3


def test_probes_never_wait_for_a_slot() -> None:
    inner = SlowApp(hold=1.5)
    app = RequestAdmission(inner, limit=1, spool_limit=1024)
    busy = threading.Thread(target=lambda: call(app))
    busy.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert call(app, "/status/live") == b"ok"
    # It ran beside the busy request (a queued one would wait about 1.3 s first).
    assert inner.peak == 2
    assert time.monotonic() - started < 1.0
    busy.join()


def test_a_long_poll_gives_its_slot_back_while_it_waits() -> None:
    admission: RequestAdmission | None = None
    waiting = threading.Event()

    def long_poll() -> None:
        assert admission is not None
        with admission.idle():
            waiting.set()
            time.sleep(1.0)

    inner = SlowApp(hold=0.0, inside=long_poll)
    admission = RequestAdmission(inner, limit=1, spool_limit=1024)
    poller = threading.Thread(target=lambda: call(admission))
    poller.start()
    assert waiting.wait(5)
    # The only slot is free while the poll waits: a second request gets in at once.
    started = time.monotonic()
    inner.inside = None
    assert call(admission) == b"ok"
    assert time.monotonic() - started < 0.9
    poller.join()


def test_bodies_are_read_before_a_slot_and_the_app_sees_them_whole() -> None:
    inner = SlowApp(hold=0.0)
    app = RequestAdmission(inner, limit=1, spool_limit=4 * 1024 * 1024)
    body = bytes(range(256)) * 8192  # 2 MiB: past the in-memory spool, onto disk
    assert call(app, body=body) == b"ok"
    assert inner.bodies[-1] == body


@pytest.mark.parametrize(
    ("path", "authorization", "spool_limit"),
    [
        ("/login", "Bearer mod_test", 1000),
        ("/api/v1/screenings", "", 1000),
        ("/hma/h/hash", "Basic x", 1000),
        ("/api/v1/screenings", "Bearer mod_test", 10),  # over the spool limit
    ],
)
def test_bodies_reach_the_app_unread(path: str, authorization: str, spool_limit: int) -> None:
    """S8: the app refuses an anonymous console form before reading its body, and a body over
    the spool limit is the app's to refuse (413) unread; admission must not read either."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ["wsgi.input"])
        start_response("413 Request Entity Too Large", [])
        return [b""]

    original = io.BytesIO(b"x" * 100)
    environ = {
        "PATH_INFO": path,
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": "100",
        "HTTP_AUTHORIZATION": authorization,
        "wsgi.input": original,
    }
    RequestAdmission(app, limit=1, spool_limit=spool_limit)(environ, lambda *a: None)
    assert seen == [original] and original.tell() == 0


def test_an_app_error_gives_the_slot_back() -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    app = RequestAdmission(broken, limit=1, spool_limit=10)
    for _ in range(3):  # a leaked slot would block the second call for ever
        with pytest.raises(RuntimeError):
            call(app)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RequestAdmission(SlowApp(), limit=0, spool_limit=10)


def test_a_response_never_closed_does_not_keep_its_slot() -> None:
    inner = SlowApp(hold=0.0)
    app = RequestAdmission(inner, limit=1, spool_limit=1024)
    environ = {"PATH_INFO": "/x", "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    for _ in range(3):  # a slot held until close() would block the second call for ever
        app(environ, lambda status, headers: None)
    assert inner.current == 0
