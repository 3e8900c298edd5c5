"""One phase of ``moderation benchmark load``: open-loop uploads over HTTP from many API clients,
with ``/status/live`` probes and ``/proc`` memory samples running beside it.

The generator is open-loop (Schroeder et al., "Open versus closed: a cautionary tale", NSDI
2006): upload ``n`` is due at ``n / rate`` s from the start, from client ``n mod clients``,
whatever the answers so far, so a slow service meets the offered load rather than throttling
it. Uploads run on a thread pool; when every thread is busy an upload starts late, and the
lateness is reported (``max_start_lag_ms``). Refusals (429, 503) are counted, never retried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from moderation.benchmark.load_images import PoolImage
from moderation.benchmark.process_rss import tree_rss_bytes

REQUEST_TIMEOUT = 30.0  # s, one upload; a request past it counts as an error (status 0)
PROBE_INTERVAL = 0.25  # s between /status/live probes and between /proc samples
PROBE_TIMEOUT = 10.0  # s; a probe past it counts as this long


@dataclass
class Post:
    """One upload request: when it was due and sent, how it was answered."""

    client: int
    image: int  # index into the pool
    due: float  # s after the phase's start
    sent_at: float = 0.0  # wall clock (time.time()) when the request was sent
    start_lag_ms: float = 0.0  # sent - due
    latency_ms: float = 0.0  # request sent -> response read
    status: int = 0  # HTTP status; 0: connection error or timeout
    upload_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status in (200, 202) and self.upload_id is not None


class LoadGenerator:
    """Posts pool images to ``base``'s upload hook, one bearer token per API client."""

    def __init__(
        self, base: str, tokens: Sequence[str], pool: Sequence[PoolImage], threads: int
    ) -> None:
        self.url = f"{base}/api/v1/screenings"
        self.tokens = list(tokens)
        self.pool = pool
        self.threads = threads
        self.next_image = 0  # continues across phases, so each phase meets other files first
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _send(self, post: Post, start: float) -> Post:
        post.start_lag_ms = max(0.0, (time.monotonic() - start - post.due) * 1000.0)
        post.sent_at = time.time()
        t0 = time.perf_counter()
        try:
            response = self._session().post(
                self.url,
                headers={"Authorization": f"Bearer {self.tokens[post.client]}"},
                data={"external_id": f"load-{post.image}", "subject_id": f"c{post.client}"},
                files={"image": ("image.jpg", self.pool[post.image].data, "image/jpeg")},
                timeout=REQUEST_TIMEOUT,
            )
            post.status = response.status_code
            if post.status in (200, 202):
                post.upload_id = str(response.json()["id"])
        except (requests.RequestException, ValueError, KeyError):
            post.status = 0
        post.latency_ms = (time.perf_counter() - t0) * 1000.0
        return post

    def run(self, rate: float, duration: float) -> list[Post]:
        """Offer ``rate`` uploads/s (all clients together) for ``duration`` s; every request,
        once all are answered.

        Raises:
            ValueError: ``rate`` or ``duration`` not positive.
        """
        if rate <= 0 or duration <= 0:
            raise ValueError(f"rate {rate} and duration {duration} must be > 0")
        count = max(1, round(rate * duration))
        posts = []
        for n in range(count):
            posts.append(Post(n % len(self.tokens), self.next_image % len(self.pool), n / rate))
            self.next_image += 1
        start = time.monotonic()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="load") as pool:
            futures = []
            for post in posts:
                delay = start + post.due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(self._send, post, start))
            return [future.result() for future in futures]


class Background:
    """A daemon thread calling ``self.sample()`` every :data:`PROBE_INTERVAL` s until
    :meth:`stop`."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        """One sample; each subclass (the RSS sampler, the liveness prober) defines it."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, PROBE_INTERVAL - (time.monotonic() - began)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 5)


class LiveProbe(Background):
    """``GET /status/live`` latencies, ms (a failed or timed-out probe counts as
    :data:`PROBE_TIMEOUT`)."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.url = f"{base}/status/live"
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.http = requests.Session()

    def sample(self) -> None:
        t0 = time.perf_counter()
        try:
            ok = self.http.get(self.url, timeout=PROBE_TIMEOUT).status_code == 200
        except requests.RequestException:
            ok = False
        elapsed = (time.perf_counter() - t0) * 1000.0
        if not ok:
            self.failures += 1
            elapsed = max(elapsed, PROBE_TIMEOUT * 1000.0)
        self.latencies_ms.append(elapsed)


class RssSampler(Background):
    """Peak summed ``VmRSS`` of named process trees (:func:`tree_rss_bytes`), bytes."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__()
        self.pids = pids
        self.peaks = dict.fromkeys(pids, 0)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peaks[name] = max(self.peaks[name], tree_rss_bytes(pid))
