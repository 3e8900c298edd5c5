"""End to end through real processes: HTTP upload -> Redis -> `moderation worker` -> signed
callback to a local server -> GET shows the same result. Also Q5 (worker settings), Q6
(idempotency) on the real stack, hot reload of a new snapshot and fail-closed on a broken one,
and the no-broker mode (issue 3, item 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from moderation.banks.operations import import_bank
from moderation.banks.versions import current_snapshot
from moderation.service.callbacks import SIGNATURE_HEADER
from moderation.service.platform_client import ModerationClient, verify_callback
from moderation.storage.models import AuditEvent, Screening, Upload
from tests.integration.queue_stack import (
    REPO,
    CallbackReceiver,
    Stack,
    bank_images,
    upload_images,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def count(stack: Stack, query: object) -> int:
    with stack.runtime.sessions() as session:
        return int(session.scalar(query) or 0)


@pytest.mark.postgres
def test_upload_worker_signed_callback_and_get(
    make_pg_stack: Callable[..., Stack],
    receiver: CallbackReceiver,
) -> None:
    stack = make_pg_stack()
    client, worker = stack.start_all([receiver.prefix])

    # Q5: the worker logged its effective reliability settings at start.
    log = worker.output()
    for setting in (
        "visibility_timeout=30",
        "task_time_limit=20",
        "task_acks_late=True",
        "task_reject_on_worker_lost=True",
        "worker_prefetch_multiplier=1",
    ):
        assert setting in log, setting

    api = ModerationClient(stack.base_url, client.token)
    banned = bank_images()["chelsea"]
    submitted = api.submit(
        banned, external_id="post-1", subject_id="user-1", callback_url=receiver.prefix + "/in"
    )
    assert submitted["status"] in ("queued", "processing", "done")

    wait_until(lambda: receiver.received, 120, "the callback")
    headers, body = receiver.received[0]
    assert verify_callback(client.callback_secret, headers[SIGNATURE_HEADER], body)
    assert not verify_callback(client.callback_secret, headers[SIGNATURE_HEADER], body + b" ")
    payload = json.loads(body)
    assert payload["id"] == submitted["id"] and payload["result"]["decision"] == "block"
    got = api.get(submitted["id"])
    assert got["status"] == "done" and got["result"] == payload["result"]
    assert got["result"]["matches"][0]["label"] == "chelsea"

    # ?wait= answers with the result.
    waited = api.submit(upload_images(1, seed=7)[0], external_id="p2", subject_id="u2", wait=10)
    assert waited["status"] == "done", waited
    assert waited["result"]["decision"] in ("allow", "review", "block")

    # Q6: the same upload posted twice with one Idempotency-Key: one row, one result.
    image = upload_images(1, seed=8)[0]
    first = api.submit(image, external_id="p3", subject_id="u3", idempotency_key="retry-me")
    second = api.submit(image, external_id="p3", subject_id="u3", idempotency_key="retry-me")
    assert first["id"] == second["id"]
    api.wait(first["id"], timeout=120)
    assert count(stack, select(func.count()).where(Upload.idempotency_key.is_not(None))) == 1
    assert count(stack, select(func.count()).where(Screening.upload_id == first["id"])) == 1

    # Metrics come from the worker processes (multiprocess directory) and the database.
    metrics = stack.get_private("/metrics").text
    assert 'moderation_stage_seconds_count{stage="embed"}' in metrics
    assert 'moderation_results_total{decision="block"} 1.0' in metrics
    assert 'moderation_queue_depth{queue="screening"} 0.0' in metrics
    assert "moderation_oldest_queued_upload_seconds 0.0" in metrics  # every upload is done
    assert 'moderation_snapshot_age_seconds{bank="' in metrics
    assert count(stack, select(func.count()).where(AuditEvent.action == "callback.deliver")) == 1


@pytest.mark.postgres
def test_snapshot_hot_reload_and_fail_closed(
    make_pg_stack: Callable[..., Stack],
    tmp_path: Path,
) -> None:
    stack = make_pg_stack()
    runtime = stack.init(bank={"astronaut": bank_images()["astronaut"]})
    client = stack.create_client([])
    stack.start_web()
    stack.start_worker()
    body = stack.wait_ready()
    assert body["checks"]["snapshot"]["current_version"] == 1
    api = ModerationClient(stack.base_url, client.token)
    coffee = bank_images()["coffee"]
    before = api.submit(coffee, external_id="c1", subject_id="u", wait=10)
    assert before["status"] == "done" and before["result"]["decision"] == "allow"

    # A new version is picked up by the running worker (bound: 30 s) without a restart.
    more = tmp_path / "more"
    more.mkdir()
    (more / "coffee.jpg").write_bytes(coffee)
    import_bank(runtime, "known-bad", [more], actor="test")

    def reloaded() -> bool:
        code, status = stack.status()
        workers = status.get("checks", {}).get("snapshot", {}).get("workers", [])
        return code == 200 and any(w["snapshot_version"] == 2 for w in workers)

    wait_until(reloaded, 30, "the worker to load snapshot v2")
    after = api.submit(coffee, external_id="c2", subject_id="u", wait=10)
    assert after["result"]["decision"] == "block" and after["result"]["index_version"] == 2

    # A snapshot that fails verification: readiness 503, nothing decided, nothing lost.
    with runtime.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        path = stack.settings().snapshots_dir / Path(row.path).name
    original = path.read_bytes()
    import_bank(runtime, "known-bad", [], actor="test")  # v3, then corrupt it
    with runtime.sessions() as session:
        row = current_snapshot(session)
        assert row is not None and row.version == 3
        path = stack.settings().snapshots_dir / Path(row.path).name
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x40
    path.write_bytes(bytes(damaged))
    wait_until(lambda: stack.status()[0] == 503, 30, "readiness to fail")
    status = stack.status()[1]["checks"]["snapshot"]
    assert any(w["error"] for w in status["workers"])
    pending = api.submit(upload_images(1, seed=3)[0], external_id="c3", subject_id="u", wait=3)
    assert pending["status"] in ("queued", "processing")
    path.write_bytes(original)  # repaired: the worker recovers and decides the upload
    done = api.wait(pending["id"], timeout=120)
    assert done["result"]["index_version"] == 3


def test_worker_refuses_unsafe_settings(tmp_path: Path, make_stack: Callable[..., Stack]) -> None:
    """Q5: visibility_timeout <= task_time_limit: the worker logs why and exits (code 3)."""
    stack = make_stack(database_url=None, broker_url=None)
    stack.init(bank={})
    env = stack.env(visibility_timeout=20, task_time_limit=20)
    result = subprocess.run(
        [sys.executable, "-m", "moderation", "worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "visibility_timeout (20 s) must exceed task_time_limit (20 s)" in result.stderr
    assert "worker reliability settings:" in result.stderr


def test_no_broker_mode(make_stack: Callable[..., Stack], receiver: CallbackReceiver) -> None:
    """Without MODERATION_BROKER_URL (and SQLite): the same API and worker code on one machine
    through kombu's SQLAlchemy transport over <data_dir>/broker.sqlite; the worker runs the
    reconciler schedule itself."""
    stack = make_stack(database_url=None, broker_url=None)
    stack.init()
    client = stack.create_client([receiver.prefix])
    stack.start_web()
    worker = stack.start_worker()
    body = stack.wait_ready()
    assert body["checks"]["broker"]["transport"] == "sqla"
    api = ModerationClient(stack.base_url, client.token)
    banned = bank_images()["astronaut"]
    submitted = api.submit(banned, external_id="n1", subject_id="u", callback_url=receiver.prefix)
    done = api.wait(submitted["id"], timeout=120)
    assert done["result"]["decision"] == "block"
    wait_until(lambda: receiver.received, 60, "the callback")
    headers, body_bytes = receiver.received[0]
    assert verify_callback(client.callback_secret, headers[SIGNATURE_HEADER], body_bytes)
    assert (stack.settings().resolved_data_dir / "broker.sqlite").exists()
    assert "beat: Starting" in worker.output()
