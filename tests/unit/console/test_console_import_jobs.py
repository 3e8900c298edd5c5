"""Issue 14, item 9: console bank imports are Celery jobs whose state is in the database: the web
view only stages the upload and sends the job to the broker, and a job lost to a restart (its
message, or its worker) is found by the recovery step and run to the end."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from moderation.banks.job_recovery import MAX_REQUEUES, lost_jobs
from moderation.banks.job_staging import imports_dir
from moderation.banks.jobs import create_import_job, job_view
from moderation.banks.records import create_bank
from moderation.service.runtime import Runtime
from moderation.storage.console import Job
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Entry
from tests.unit.console.test_console_banks import bank_id, photo_zip


def stage_photos_job(rt: Runtime, bank: str) -> str:
    """A queued console import job of the three bank photos into ``bank``; its id."""
    with transaction(rt.sessions) as db:
        return create_import_job(
            db,
            rt.settings,
            bank_name=bank,
            archive=io.BytesIO(photo_zip()),
            filename="bank.zip",
            created_by="user:1",
            max_bytes=10**8,
        ).id


def _age(rt: Runtime, job_id: str, *, state: str, minutes: float) -> None:
    when = datetime.now(UTC) - timedelta(minutes=minutes)
    with transaction(rt.sessions) as db:
        db.execute(update(Job).where(Job.id == job_id).values(state=state, updated_at=when))


def test_console_import_only_sends_the_job_to_the_workers(
    make_app: Callable[..., Flask],
    client_for: Callable[[Flask], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    from workers.celery_app import JOB_TASK, create_celery
    from workers.dispatch import CeleryJobRunner

    rt = console_runtime
    app = make_app({"JOB_RUNNER": None})  # the production default
    assert isinstance(app.extensions["moderation.jobs"], CeleryJobRunner)
    client = client_for(app)
    client.login(make_user("admin"))
    with transaction(rt.sessions) as db:
        create_bank(db, "queued-bank")
    bid = bank_id(rt, "queued-bank")
    response = client.post(
        f"/banks/{bid}/import",
        data={
            "archive": (io.BytesIO(photo_zip()), "bank.zip"),
            "csrf_token": client.token(f"/banks/{bid}"),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 302
    with rt.sessions() as db:
        job = db.scalars(select(Job)).one()
        assert job.state == "queued"  # nothing ran in the web process
        assert db.scalar(select(func.count()).select_from(Entry)) == 0
    assert list(imports_dir(rt.settings).glob("*"))  # staged, sealed, for the worker
    celery = create_celery(rt.settings)
    with celery.connection_for_read() as connection:
        queue = connection.SimpleQueue("maintenance")
        message = queue.get(timeout=10)
        assert message.headers["task"] == JOB_TASK and message.payload[0] == [job.id]
        message.ack()
        queue.close()


def test_recovery_finds_the_jobs_a_restart_lost(console_runtime: Runtime) -> None:
    rt = console_runtime
    with transaction(rt.sessions) as db:
        create_bank(db, "recovered")
    crashed, unsent, fresh = (
        stage_photos_job(rt, "recovered"),
        stage_photos_job(rt, "recovered"),
        stage_photos_job(rt, "recovered"),
    )
    _age(rt, crashed, state="running", minutes=20)  # its worker was killed mid-import
    _age(rt, unsent, state="queued", minutes=10)  # the web process died before the send
    _age(rt, fresh, state="running", minutes=1)  # still working
    assert sorted(lost_jobs(rt)) == sorted([crashed, unsent])
    assert lost_jobs(rt) == []  # sent again only after another resend period
    with rt.sessions() as db:
        assert db.get(Job, crashed).state == "queued"  # type: ignore[union-attr]
        assert db.get(Job, fresh).state == "running"  # type: ignore[union-attr]
        (requeue,) = db.scalars(select(AuditEvent).where(AuditEvent.action == "job.requeue"))
    assert requeue.target == f"job:{crashed}"
    # A job that keeps killing its worker is given up after MAX_REQUEUES, its upload deleted.
    with transaction(rt.sessions) as db:
        job = db.get(Job, crashed)
        assert job is not None and job.params["requeues"] == 1
        job.params = {**job.params, "requeues": MAX_REQUEUES}
    _age(rt, crashed, state="running", minutes=20)
    staged = {p.name for p in imports_dir(rt.settings).glob("*")}
    assert lost_jobs(rt) == []
    with rt.sessions() as db:
        gone = db.get(Job, crashed)
        assert gone is not None and gone.state == "failed" and "not retried" in gone.result["error"]
    assert len(staged - {p.name for p in imports_dir(rt.settings).glob("*")}) == 1


def test_a_job_resent_after_a_worker_crash_runs_to_the_end(
    console_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks as tasks
    from workers.celery_app import JOB_TASK, RECOVER_JOBS_TASK, celery_config

    rt = console_runtime
    monkeypatch.setattr(tasks, "_runtime", rt)
    with transaction(rt.sessions) as db:
        create_bank(db, "resumed")
    job_id = stage_photos_job(rt, "resumed")
    _age(rt, job_id, state="running", minutes=30)
    tasks.run_console_job(job_id)  # a duplicate delivery while "running" does nothing
    assert lost_jobs(rt) == [job_id]
    tasks.run_console_job(job_id)  # the re-sent task, on a worker
    with rt.sessions() as db:
        view = job_view(db, job_id)
        assert view is not None and view.state == "done" and view.result["added"] == 3
        assert db.scalar(select(func.count()).select_from(Entry)) == 3
    assert not list(imports_dir(rt.settings).glob("*"))
    schedule = celery_config(rt.settings)["beat_schedule"]
    assert RECOVER_JOBS_TASK in {entry["task"] for entry in schedule.values()}
    assert {JOB_TASK, RECOVER_JOBS_TASK} <= set(tasks.app.tasks)
