"""RELIABILITY.md Q1-Q4 against a real Redis, real `moderation worker` processes and PostgreSQL.

Faults are injected for real: SIGKILL of pool children and of the whole worker (its process
group, like a container kill), a worker child that dies on one image (Q3), Redis killed without
saving and restarted on the same port (Q4). Waits poll with generous deadlines: this machine has
2 shared cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from moderation.service.platform_client import ApiError, ModerationClient
from moderation.storage.models import (
    AuditEvent,
    CallbackDelivery,
    Screening,
    Upload,
)
from tests.integration.queue_stack import (
    CallbackReceiver,
    RedisServer,
    Stack,
    bank_images,
    upload_images,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]


POISON_DIR = Path(__file__).resolve().parent / "poison"


def scalar(stack: Stack, query: Any) -> Any:
    with stack.runtime.sessions() as session:
        return session.scalar(query)


def done_count(stack: Stack, ids: list[str]) -> int:
    return int(
        scalar(
            stack,
            select(func.count()).where(Upload.id.in_(ids), Upload.status == "done"),
        )
        or 0
    )


def assert_exactly_one_result_each(stack: Stack, ids: list[str]) -> None:
    """Every upload terminal, one screening, one decision audit event, one receive event."""
    with stack.runtime.sessions() as session:
        statuses = dict(
            session.execute(select(Upload.id, Upload.status).where(Upload.id.in_(ids))).all()
        )
        assert len(statuses) == len(ids)
        assert set(statuses.values()) == {"done"}
        per_upload = session.execute(
            select(Screening.upload_id, func.count())
            .where(Screening.upload_id.in_(ids))
            .group_by(Screening.upload_id)
        ).all()
        assert len(per_upload) == len(ids) and {n for _, n in per_upload} == {1}
        decided = session.execute(
            select(AuditEvent.target, func.count())
            .where(AuditEvent.action == "screening.decide")
            .group_by(AuditEvent.target)
        ).all()
        assert {n for _, n in decided} == {1}
        assert {t for t, _ in decided} >= {f"upload:{i}" for i in ids}
        received = session.scalar(select(func.count()).where(AuditEvent.action == "upload.receive"))
        assert received == len(ids)


class Submitter(threading.Thread):
    """Posts images at a steady rate; retries refused or failed posts with the same
    Idempotency-Key (as a platform would), so each image becomes exactly one upload."""

    def __init__(
        self, api: ModerationClient, images: list[bytes], interval: float, callback: str | None
    ) -> None:
        super().__init__(daemon=True)
        self.api, self.images, self.interval, self.callback = api, images, interval, callback
        self.ids: list[str] = []
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n, image in enumerate(self.images):
                deadline = time.monotonic() + 300
                while True:
                    try:
                        body = self.api.submit(
                            image,
                            external_id=f"post-{n}",
                            subject_id=f"user-{n % 7}",
                            callback_url=self.callback,
                            idempotency_key=f"post-{n}",
                        )
                        self.ids.append(body["id"])
                        break
                    except (ApiError, requests.RequestException):
                        self.refused += 1
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(1.0)
                time.sleep(self.interval)
        except BaseException as exc:
            self.error = exc


def all_decided(stack: Stack, submitter: Submitter, count: int, *, timeout: float) -> None:
    """Wait for ``submitter`` to place ``count`` distinct uploads and for each to be decided
    exactly once (within ``timeout`` s)."""
    submitter.join(400)
    assert submitter.error is None, submitter.error
    ids = submitter.ids
    assert len(ids) == count and len(set(ids)) == count
    wait_until(lambda: done_count(stack, ids) == count, timeout, "every upload decided", 2.0)
    assert_exactly_one_result_each(stack, ids)


def test_q1_q2_worker_children_and_whole_worker_killed(
    make_pg_stack: Callable[..., Stack],
    receiver: CallbackReceiver,
) -> None:
    stack = make_pg_stack()
    client, worker = stack.start_all([receiver.prefix], concurrency=2)

    banned = list(bank_images().values())
    images = upload_images(200, seed=1)
    for n in range(0, 200, 10):  # every tenth upload is a banned photo
        images[n] = banned[n // 10 % len(banned)]
    api = ModerationClient(stack.base_url, client.token, timeout=30)
    submitter = Submitter(api, images, interval=0.1, callback=receiver.prefix + "/in")
    submitter.start()
    rng = random.Random(0)

    # Q1: SIGKILL a pool child at random points, several times.
    wait_until(lambda: len(submitter.ids) >= 20, 120, "the first uploads")
    kills = 0
    for _ in range(4):
        children = wait_until(worker.children, 120, "worker pool children")
        os.kill(rng.choice(children), signal.SIGKILL)
        kills += 1
        time.sleep(rng.uniform(2.0, 5.0))
    # Q2: SIGKILL the whole worker (main process and children), then start a new one.
    wait_until(lambda: len(submitter.ids) >= 120, 180, "more uploads")
    worker.kill_all()
    time.sleep(3)
    stack.start_worker(concurrency=2)

    all_decided(stack, submitter, 200, timeout=480)
    with stack.runtime.sessions() as session:
        blocked = session.scalar(select(func.count()).where(Screening.decision == "block"))
        poison = session.scalar(select(func.count()).where(Screening.reason == "poison"))
        retried = session.scalar(select(func.count()).where(Upload.attempts > 1))
    assert blocked is not None and blocked >= 20
    assert poison == 0

    # Callbacks: one delivery per upload, each delivered and audited once.
    def all_delivered() -> bool:
        states = scalar(
            stack,
            select(func.count()).where(CallbackDelivery.state == "delivered"),
        )
        return bool(states == 200)

    wait_until(all_delivered, 300, "every callback to be delivered", 2.0)
    assert scalar(stack, select(func.count()).select_from(CallbackDelivery)) == 200
    audited = scalar(
        stack,
        select(func.count(func.distinct(AuditEvent.target))).where(
            AuditEvent.action == "callback.deliver"
        ),
    )
    events = scalar(stack, select(func.count()).where(AuditEvent.action == "callback.deliver"))
    assert audited == events == 200
    delivered_ids = {json.loads(body)["delivery_id"] for _, body in receiver.received}
    assert len(delivered_ids) == 200
    # A POST repeats only when a worker died between sending it and recording it.
    assert len(receiver.received) <= 200 + kills + 2
    print(f"uploads retried after a kill: {retried}; callback POSTs: {len(receiver.received)}")


def test_q3_poison_upload_ends_unscannable(make_pg_stack: Callable[..., Stack]) -> None:
    stack = make_pg_stack(max_attempts=2)
    stack.init()
    client = stack.create_client([])
    stack.start_web()
    marker = "POISON-PILL-7f3a"
    worker = stack.start_worker(
        raw_env={
            "TEST_POISON_MARKER": marker,
            "PYTHONPATH": f"{POISON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
    )
    stack.start_beat()
    stack.wait_ready()
    api = ModerationClient(stack.base_url, client.token, timeout=30)
    images = upload_images(16, seed=5)
    # Bytes after a JPEG's end-of-image marker are ignored by decoders: still a valid JPEG.
    poison_image = images[0] + marker.encode()
    poison_id = api.submit(poison_image, external_id="poison", subject_id="u")["id"]
    others = [
        api.submit(image, external_id=f"ok-{n}", subject_id="u")["id"]
        for n, image in enumerate(images[1:])
    ]
    wait_until(lambda: done_count(stack, [poison_id, *others]) == 16, 300, "all 16 decided", 2.0)
    with stack.runtime.sessions() as session:
        screening = session.scalar(select(Screening).where(Screening.upload_id == poison_id))
        assert screening is not None
        assert (screening.decision, screening.reason) == ("unscannable", "poison")
        upload = session.get(Upload, poison_id)
        assert upload is not None and upload.attempts == 2
        reasons = session.scalars(select(Screening.reason).where(Screening.upload_id.in_(others)))
        assert "poison" not in set(reasons)
        # Every attempt after an upload's first is a redelivery, and so is the task that finds
        # the attempts used up. Uploads that shared the poison's batch were attempted twice.
        attempts = session.scalars(
            select(Upload.attempts).where(Upload.id.in_([poison_id, *others]))
        ).all()
        redeliveries = sum(n - 1 for n in attempts) + 1
    assert_exactly_one_result_each(stack, [poison_id, *others])
    assert "did not finish in 2 attempts: recording unscannable (poison)" in worker.output()
    metrics = stack.get_private("/metrics").text
    assert "moderation_poison_uploads_total 1.0" in metrics
    assert 'moderation_unscannable_results_total{reason="poison"} 1.0' in metrics
    assert f"moderation_redeliveries_total {float(redeliveries)}" in metrics


def test_q4_redis_lost_and_restarted(
    make_pg_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    stack = make_pg_stack()
    client, worker = stack.start_all([])
    api = ModerationClient(stack.base_url, client.token, timeout=30)
    submitter = Submitter(api, upload_images(100, seed=9), interval=0.15, callback=None)
    submitter.start()

    wait_until(lambda: len(submitter.ids) >= 35, 120, "uploads in flight")
    redis_server.stop_without_saving()
    # While Redis is down the hook keeps answering: 202 with a committed row, or an error
    # the platform retries; it never accepts a job it then loses.
    accepted_before = len(submitter.ids)
    time.sleep(8)
    accepted_during = len(submitter.ids) - accepted_before
    redis_server.start()  # empty: every queued message is gone

    all_decided(stack, submitter, 100, timeout=420)
    assert worker.alive(), "the worker must reconnect by itself, not die"
    print(f"accepted while Redis was down: {accepted_during}; refused: {submitter.refused}")
