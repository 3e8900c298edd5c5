"""RELIABILITY.md S3 over real HTTP: offered load above what the workers screen.

A real ``moderation serve`` (gunicorn, two processes) on PostgreSQL with Redis as the broker and
no worker running, so every accepted upload stays in the queue: past the client's share the hook
answers 429, past the global bound 503, both with ``Retry-After`` and before storing anything,
while another client is still accepted below the global bound. Then a real ``moderation worker``
starts and screens every accepted upload exactly once (nothing accepted is lost), and the hook
accepts again once the queue has drained.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from moderation.storage.models import Screening, Upload
from tests.integration.queue_stack import RedisServer, Stack, upload_images, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.postgres]

IMAGES = upload_images(12, seed=19)


def post(stack: Stack, token: str, index: int) -> requests.Response:
    return requests.post(
        f"{stack.base_url}/api/v1/screenings",
        headers={"Authorization": f"Bearer {token}"},
        data={"external_id": f"post-{index}", "subject_id": "user-1"},
        files={"image": ("image.jpg", IMAGES[index % len(IMAGES)])},
        timeout=60,
    )


def refusal(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["Retry-After"] == "3"


def count(stack: Stack, query: Any) -> int:
    with stack.runtime.sessions() as session:
        return int(session.scalar(query) or 0)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def live(stack: Stack) -> bool:
    web = stack.services[0]
    if not web.alive():
        raise AssertionError(f"web died:\n{web.output()[-3000:]}")
    try:
        return requests.get(f"{stack.base_url}/status/live", timeout=10).ok
    except requests.RequestException:  # not listening yet, or too busy starting
        return False


def test_s3_queue_bound_refuses_with_retry_after_and_loses_nothing(
    make_pg_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    stack = make_pg_stack(queue_max_depth=6, queue_max_depth_per_client=4, queue_retry_after=3)
    stack.init()
    acme, other = stack.create_client([]).token, stack.create_client([]).token
    stack.start_web()
    wait_until(lambda: live(stack), 120, "the web tier to answer /status/live")
    accepted: list[str] = []
    for index in range(4):
        response = post(stack, acme, index)
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])

    # acme's share is full: 429 for acme, while the other platform is still accepted.
    refusal(post(stack, acme, 4), 429, "client_queue_full")
    for index in range(5, 7):
        response = post(stack, other, index)
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    # The global bound: 503 for everyone.
    refusal(post(stack, other, 7), 503, "queue_full")
    refusal(post(stack, acme, 8), 503, "queue_full")

    # Refused uploads left no row and sent no task; every accepted one waits. What waits in
    # Redis is bounded by the queue bound (one small message per accepted upload).
    assert count(stack, select(func.count()).select_from(Upload)) == 6
    assert redis_server.llen("screening") == 6
    metrics = stack.get_private("/metrics").text
    assert metric(metrics, 'moderation_uploads_refused_total{reason="client_queue_full"}') == 1
    assert metric(metrics, 'moderation_uploads_refused_total{reason="queue_full"}') == 2
    assert metric(metrics, "moderation_queue_max_depth") == 6
    assert metric(metrics, 'moderation_uploads{status="queued"}') == 6

    # A worker drains the queue: each accepted upload screened once; nothing lost.
    stack.start_worker()
    stack.wait_ready()

    def all_screened() -> bool:
        done = select(func.count()).where(Upload.id.in_(accepted), Upload.status == "done")
        return count(stack, done) == len(accepted)

    wait_until(all_screened, 300, "every accepted upload screened")
    assert count(stack, select(func.count()).select_from(Screening)) == len(accepted)
    assert count(stack, select(func.count(func.distinct(Screening.upload_id)))) == len(accepted)
    for upload_id in accepted[:1] + accepted[-1:]:
        got = requests.get(
            f"{stack.base_url}/api/v1/screenings/{upload_id}",
            headers={"Authorization": f"Bearer {acme if upload_id in accepted[:4] else other}"},
            timeout=30,
        )
        assert got.status_code == 200 and got.json()["result"]["decision"] in (
            "allow",
            "review",
            "block",
        )

    # The depth is read from the rows: once drained, both clients are accepted again.
    assert post(stack, acme, 9).status_code == 202
    assert post(stack, other, 10).status_code == 202
