"""Issue 14, item 9 on the real stack: a console import job sent while no worker runs (the web
process then restarting) is run by a worker started later; a job whose worker died mid-import
is re-sent by the recovery step and finished by a live worker."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from moderation.banks.job_recovery import lost_jobs
from moderation.banks.jobs import job_view
from moderation.banks.records import create_bank
from moderation.storage.console import Job
from moderation.storage.db import transaction
from tests.integration.queue_stack import RedisServer, Stack, wait_until
from tests.unit.console.test_console_import_jobs import stage_photos_job


def _done(stack: Stack, job_id: str) -> bool:
    with stack.runtime.sessions() as db:
        view = job_view(db, job_id)
    assert view is not None and view.state != "failed", view
    return view.state == "done"


@pytest.mark.redis
@pytest.mark.slow
def test_import_jobs_survive_restarts(
    make_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    from workers.celery_app import create_celery
    from workers.dispatch import CeleryJobRunner

    stack = make_stack(
        database_url=None, broker_url=redis_server.url, task_time_limit=120, visibility_timeout=300
    )
    stack.init(bank={})
    with transaction(stack.runtime.sessions) as db:
        create_bank(db, "console")
    runner = CeleryJobRunner(create_celery(stack.settings()))
    first = stage_photos_job(stack.runtime, "console")
    runner.submit(first)  # the web process sends it, then goes away; no worker runs yet
    worker = stack.start_worker()
    try:
        wait_until(lambda: _done(stack, first), 240, "the worker to run the queued import")
    except AssertionError:
        print(worker.output()[-4000:])
        raise
    # A worker killed mid-import leaves its job "running" without progress: recovery re-sends it.
    second = stage_photos_job(stack.runtime, "console")
    with transaction(stack.runtime.sessions) as db:
        stale = datetime.now(UTC) - timedelta(minutes=30)
        db.execute(update(Job).where(Job.id == second).values(state="running", updated_at=stale))
    for job_id in lost_jobs(stack.runtime):
        runner.submit(job_id)
    wait_until(lambda: _done(stack, second), 240, "the re-sent import to finish")
    with stack.runtime.sessions() as db:
        views = [job_view(db, first), job_view(db, second)]
    assert [v.result["added"] for v in views if v is not None] == [3, 0]  # the same photos
