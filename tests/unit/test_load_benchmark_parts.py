"""The parts of ``moderation benchmark load`` that need no deployment: process-tree memory from
/proc, the open-loop generator against a local HTTP server, the phase figures, the upload pool.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from moderation.benchmark.load import LoadOptions
from moderation.benchmark.load_images import FLAGGED, upload_pool
from moderation.benchmark.load_phase import LoadGenerator, Post
from moderation.benchmark.load_report import phase_figures
from moderation.benchmark.process_rss import descendants, tree_rss_bytes
from moderation.benchmark.processes import wait_for

# A parent that starts a child holding 64 MiB, then both sleep.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time; block = bytearray(64 * 1024 * 1024); print('ready', flush=True); time.sleep(60)"],
    stdout=sys.stdout)
time.sleep(60)
"""


def test_tree_rss_counts_the_children() -> None:
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        pids = wait_for(lambda: descendants(parent.pid), 10, "the child process")
        assert len(pids) == 1
        alone = tree_rss_bytes(pids[0])
        assert alone > 64 * 1024 * 1024  # the child's bytearray is resident
        assert tree_rss_bytes(parent.pid) > alone  # parent + child
    finally:
        parent.kill()
        parent.wait(10)
    time.sleep(0.1)
    assert tree_rss_bytes(parent.pid) == 0  # gone (reaped): nothing to count


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local upload hook: 202 with an id for tokens "ok", 429 for the others."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            token = self.headers["Authorization"].removeprefix("Bearer ")
            seen.append({"token": token, "at": time.monotonic()})
            status, body = (202, {"id": f"u{len(seen)}"}) if token == "ok" else (429, {})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_generator_is_open_loop_and_counts_refusals(
    hook: tuple[str, list[dict[str, Any]]],
) -> None:
    base, seen = hook
    pool = upload_pool(5)
    generator = LoadGenerator(base, ["ok", "limited"], pool, threads=4)
    posts = generator.run(rate=20.0, duration=1.0)
    assert len(posts) == len(seen) == 20
    # Clients alternate; the limited client's uploads are refused and not retried.
    assert [p.client for p in posts[:4]] == [0, 1, 0, 1]
    assert sum(p.status == 202 for p in posts) == 10 and sum(p.status == 429 for p in posts) == 10
    assert all(p.accepted == (p.client == 0) for p in posts)
    # Spread over the second (due times n / rate), not sent at once.
    assert seen[-1]["at"] - seen[0]["at"] > 0.6
    assert [p.image for p in posts[:7]] == [0, 1, 2, 3, 4, 0, 1]  # the pool cycles


def test_phase_figures() -> None:
    pool = upload_pool(10, copy_share=0.5)
    copy = next(i for i, p in enumerate(pool) if p.expected == FLAGGED)
    other = next(i for i, p in enumerate(pool) if p.expected == {"allow"})
    posts = [
        Post(0, copy, 0.0, sent_at=100.0, latency_ms=10.0, status=202, upload_id="a"),
        Post(1, other, 0.1, sent_at=100.0, latency_ms=30.0, status=202, upload_id="b"),
        Post(0, other, 0.2, sent_at=100.0, latency_ms=20.0, status=200, upload_id="c"),
        Post(1, copy, 0.3, sent_at=100.0, latency_ms=5.0, status=429),
        Post(0, copy, 0.4, sent_at=100.0, latency_ms=5.0, status=503),
        Post(1, copy, 0.5, sent_at=100.0, status=0),
    ]
    # "a" right (block), "b" wrong (a copy's decision on an unrelated image), "c" never done.
    done = {"a": ("block", 101.0), "b": ("block", 103.0)}
    figures = phase_figures(posts, done, pool, {"web": 3 * 2**20, "worker": 0, "redis": 0}, None)
    assert figures["status"] == {"202": 2, "200": 1, "429": 1, "503": 1, "other": 1}
    assert (figures["accepted"], figures["refused"]) == (3, 3)
    assert (figures["finished"], figures["lost"], figures["wrong"]) == (2, 1, 1)
    assert figures["wrong_kinds"] == {f"{pool[other].kind} -> block": 1}
    assert figures["post_p50_ms"] == 20.0
    assert figures["result_p50_s"] == 2.0 and figures["result_p99_s"] == pytest.approx(2.98)
    assert figures["peak_rss_mb"]["web"] == 3.0 and figures["live"] is None


def test_pool_is_seeded_and_distinct() -> None:
    first, again = upload_pool(30, seed=3), upload_pool(30, seed=3)
    assert [p.data for p in first] == [p.data for p in again]
    assert len({p.data for p in first}) == 30
    kinds = {p.kind.split(":")[0] for p in first}
    assert kinds == {"copy", "crop", "generated"}
    for image in first:
        assert image.expected == (FLAGGED if image.kind.startswith("copy") else {"allow"})
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.format == "JPEG" and max(decoded.size) <= 320


def test_options_overrides() -> None:
    quick = LoadOptions.quick().with_overrides(rate=None, clients=2, client_limit="1/second")
    assert (quick.duration, quick.clients, quick.client_limit) == (3.0, 2, "1/second")
    with pytest.raises(ValueError, match="size"):
        upload_pool(0)
