"""RELIABILITY.md S1 and S2 over real HTTP against a real ``moderation serve`` (gunicorn, two
processes), PostgreSQL and a private Redis: slow clients (slowloris) and long polls must not
starve ``/status/live`` or other clients' uploads.

No worker runs, so uploads stay ``queued`` and every ``?wait=10`` lasts its full 10 s. "Healthy"
is the acceptance criterion's own timing bound: each ``/status/live`` answers in under 1 s.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.integration.queue_stack import Stack, upload_images, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

LIVE_BOUND = 1.0  # s, RELIABILITY.md "healthy"
SLOW_CLIENTS = 50  # S1
TRICKLE_SECONDS = 18  # S1 bounds the attack to 60 s; 18 s of it is enough to starve threads
WAIT_CAP = 8  # S2: MODERATION_API_MAX_CONCURRENT_WAITS_PER_CLIENT of the test stack
LONG_POLLS = 30  # S2: more than the cap, within the client's rate limit (40/minute)


def live_seconds(stack: Stack) -> float:
    """Seconds ``GET /status/live`` took (a fresh connection each time); fails if not 200."""
    started = time.monotonic()
    try:
        response = requests.get(f"{stack.base_url}/status/live", timeout=5)
    except requests.Timeout:
        return 5.0
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    return elapsed


def upload(stack: Stack, token: str, seed: int) -> requests.Response:
    return requests.post(
        f"{stack.base_url}/api/v1/screenings",
        headers={"Authorization": f"Bearer {token}"},
        files={"image": ("x.jpg", upload_images(1, seed=seed)[0], "image/jpeg")},
        data={"external_id": f"post-{seed}", "subject_id": f"user-{seed}"},
        timeout=10,
    )


def get(stack: Stack, token: str, upload_id: str, wait: float = 0) -> requests.Response:
    return requests.get(
        f"{stack.base_url}/api/v1/screenings/{upload_id}",
        params={"wait": wait} if wait else None,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10 + wait,
    )


@pytest.fixture
def web(make_pg_stack: Callable[..., Stack]) -> Iterator[Stack]:
    """Schema, bank and ``moderation serve`` (no worker), answering ``/status/live``."""
    stack = make_pg_stack(api_rate_limit="40/minute", api_max_concurrent_waits_per_client=WAIT_CAP)
    stack.init()
    web = stack.start_web()

    def live() -> bool:
        if not web.alive():
            raise AssertionError(f"web died:\n{web.output()[-3000:]}")
        try:
            return requests.get(f"{stack.base_url}/status/live", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(live, 120, "/status/live to answer")
    yield stack


def trickle(sockets: list[socket.socket], seconds: float, stop: threading.Event) -> None:
    """Send one header byte a second on every socket, never ending the headers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(b"a")
        stop.wait(1.0)


def test_s1_slowloris_keeps_liveness_and_uploads(web: Stack) -> None:
    token = web.create_client([]).token
    sockets = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        sock.send(b"GET /status/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sockets.append(sock)
    stop = threading.Event()
    attacker = threading.Thread(target=trickle, args=(sockets, TRICKLE_SECONDS, stop))
    attacker.start()
    try:
        time.sleep(2)  # every slow connection has been accepted and is mid-headers
        started = time.monotonic()
        lives, uploads = [], []
        while time.monotonic() - started < TRICKLE_SECONDS - 4:
            lives.append(live_seconds(web))
            if len(lives) % 5 == 0:
                uploads.append(upload(web, token, seed=len(lives)))
            time.sleep(0.25)
        still_held = attacker.is_alive()
    finally:
        stop.set()
        attacker.join(30)
        for sock in sockets:
            sock.close()
    print(f"S1: /status/live max {max(lives):.3f} s over {len(lives)} requests")
    assert max(lives) < LIVE_BOUND, f"/status/live took {max(lives):.2f} s: {lives}"
    assert still_held, "the slow clients stopped before the checks ended"
    assert len(lives) >= 10, lives
    assert uploads and all(r.status_code == 202 for r in uploads), [
        (r.status_code, r.text[:200]) for r in uploads
    ]


def test_s2_long_polls_capped_per_client(web: Stack) -> None:
    greedy, other = web.create_client([]).token, web.create_client([]).token
    first = upload(web, greedy, seed=1)
    assert first.status_code == 202, first.text
    upload_id = first.json()["id"]

    answers: list[Any] = [None] * LONG_POLLS
    start = threading.Barrier(LONG_POLLS + 1)

    def long_poll(i: int) -> None:
        start.wait()
        begun = time.monotonic()
        try:
            response = get(web, greedy, upload_id, wait=10)
            answers[i] = (response, time.monotonic() - begun)
        except requests.RequestException as exc:
            answers[i] = (exc, time.monotonic() - begun)

    polls = [threading.Thread(target=long_poll, args=(i,)) for i in range(LONG_POLLS)]
    for poll in polls:
        poll.start()
    start.wait()
    time.sleep(1.5)  # the admitted polls are waiting, the others were refused
    lives = [live_seconds(web) for _ in range(8)]
    others = [upload(web, other, seed=2)]
    others.append(get(web, other, others[0].json().get("id", "missing")))
    for poll in polls:
        poll.join(60)

    print(f"S2: /status/live max {max(lives):.3f} s over {len(lives)} requests")
    assert max(lives) < LIVE_BOUND, f"/status/live took {max(lives):.2f} s: {lives}"
    assert [r.status_code for r in others] == [202, 202], [r.text[:200] for r in others]
    responses = [a[0] for a in answers]
    assert all(isinstance(r, requests.Response) for r in responses), responses
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * WAIT_CAP + [429] * (LONG_POLLS - WAIT_CAP), codes
    for response, seconds in answers:
        if response.status_code == 202:
            assert seconds >= 9, seconds  # it waited (the upload never finishes: no worker)
        else:
            assert response.json()["error"]["code"] == "too_many_waits"
            assert 1 <= int(response.headers["Retry-After"]) <= 10, response.headers
    # The waits that ended gave their slots back.
    again = get(web, greedy, upload_id, wait=1)
    assert again.status_code == 202, again.text
