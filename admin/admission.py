"""Bounded work per web process: at most ``web_active_requests`` requests are worked on at once.

Under gunicorn's gevent workers (``moderation serve``'s default, README "Serving model") every
connection is a greenlet, so a thousand slow or idle clients cost little. Without a bound,
though, every request that *has* arrived is worked on at once: a burst of 64 uploads interleaves
64 request handlers on one core, each one's database round trips and file writes queue behind
all the others', and each needs its own database connection (beyond the pool: a new PostgreSQL
connection per request). Measured with ``moderation benchmark load`` (PostgreSQL, 70 uploads/s
offered): accepted-POST p50 2.3 s unbounded against 0.18 s with a bound, as with gthread's 8
threads.

So this WSGI middleware, the outermost one, admits a request into the app only while fewer than
``limit`` are in it (a ``threading.BoundedSemaphore``: a greenlet semaphore once gevent has
patched ``threading``; FIFO enough under gevent's hub). Before waiting for a slot it reads a
request body of known length (up to ``spool_limit`` bytes; spooled to a temporary file past 1 MiB)
of an API request with a bearer token, so such a client that sends its body slowly holds a
greenlet but never a slot (other requests' bodies are left to the app, which refuses anonymous
ones before reading them, RELIABILITY.md S8). Liveness and readiness
(``/status/live``, ``/status/ready``) skip the queue: they must answer while the app is busy
(RELIABILITY.md S1, S2). A ``?wait=`` long poll gives its slot back while it waits
(:meth:`RequestAdmission.idle`).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import IO, Any

from werkzeug.wsgi import ClosingIterator

#: Paths answered without queueing for a slot (probes).
EXEMPT_PATHS = frozenset({"/status/live", "/status/ready"})

#: Paths whose bodies are read before admission (the upload hook and the HMA API).
SPOOLED_PREFIXES = ("/api/", "/hma/")

#: Bodies up to this size are spooled in memory before admission, larger ones to a temp file.
SPOOL_MEMORY_BYTES = 1024 * 1024

#: Bytes read from ``wsgi.input`` per call while spooling.
READ_CHUNK = 64 * 1024


class RequestAdmission:
    """WSGI middleware bounding the requests one process works on at once (see module doc):
    a slot is held while the app's callable runs (the view), not while a streamed body is sent.

    ``limit`` >= 1 requests in the app at once; ``spool_limit`` bytes: the largest declared
    ``Content-Length`` read before admission (larger bodies go to the app unread, which
    refuses them with 413 before reading).
    """

    def __init__(self, app: Any, limit: int, spool_limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.app = app
        self.limit = limit
        self.spool_limit = spool_limit
        self._slots = threading.BoundedSemaphore(limit)
        self._local = threading.local()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in EXEMPT_PATHS:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        spooled = _spool_body(environ, self.spool_limit) if _spoolable(environ) else None
        self._acquire()
        try:
            # Flask has run the view when this returns (a streamed body, e.g. an export, is
            # iterated after the slot is given back): releasing here cannot leak a slot to a
            # caller that never closes the response.
            result = self.app(environ, start_response)
        finally:
            self._release()
        return result if spooled is None else ClosingIterator(result, [spooled.close])

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Give this request's slot back for the block (a long poll's wait), then take one
        again; a no-op outside an admitted request."""
        if not getattr(self._local, "held", False):
            yield
            return
        self._release()
        try:
            yield
        finally:
            self._acquire()

    def _acquire(self) -> None:
        self._slots.acquire()
        self._local.held = True

    def _release(self) -> None:
        if getattr(self._local, "held", False):
            self._local.held = False
            self._slots.release()


def _spoolable(environ: dict[str, Any]) -> bool:
    """Bodies read ahead: those of the machine APIs (:data:`SPOOLED_PREFIXES`) sent with a bearer
    token. Anything else reaches the app unread, so an anonymous console form is refused before
    its body is read (RELIABILITY.md S8) and no anonymous request costs a read of its body."""
    path = environ.get("PATH_INFO") or ""
    authorization = environ.get("HTTP_AUTHORIZATION") or ""
    return path.startswith(SPOOLED_PREFIXES) and authorization[:7].lower() == "bearer "


def _spool_body(environ: dict[str, Any], spool_limit: int) -> IO[bytes] | None:
    """Replace ``wsgi.input`` by the body read to its end when ``Content-Length`` declares
    1..``spool_limit`` bytes, and return the spooled file (the caller closes it); a short body
    (client gone) leaves what arrived, so the app sees a truncated request and refuses it as it
    would have."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if not 0 < length <= spool_limit:
        return None
    source: IO[bytes] = environ["wsgi.input"]
    spooled = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
    left = length
    while left > 0:
        chunk = source.read(min(READ_CHUNK, left))
        if not chunk:
            break
        spooled.write(chunk)
        left -= len(chunk)
    spooled.seek(0)
    environ["wsgi.input"] = spooled
    environ["CONTENT_LENGTH"] = str(length - left)
    return spooled
