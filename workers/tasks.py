"""Thin Celery tasks: take an id, call one library function (STYLE.md rule 13).

Each worker process builds one :class:`~moderation.service.runtime.Runtime` after fork; processes
that
consume the ``screening`` queue also load the encoder and the current snapshot right away
(``worker_process_init``) and keep them current (:class:`~moderation.service.worker.WorkerState`).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from celery import signals
from sqlalchemy.exc import SQLAlchemyError

from moderation.audit.log import checkpoint_if_due
from moderation.banks.flood_control import check_flood
from moderation.banks.job_recovery import lost_jobs
from moderation.banks.jobs import run_job
from moderation.governance.holds import release_expired_holds
from moderation.modelops.encoder_migration import resume_migration
from moderation.service.callbacks import deliver_callback
from moderation.service.dispatch import attach_dispatcher
from moderation.service.model_events import add_change_listener
from moderation.service.queue import RetryLater, process_upload, reconcile
from moderation.service.runtime import Runtime
from moderation.service.waits import publish_done_uploads
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from workers.celery_app import (
    CALLBACK_TASK,
    CANARY_TASK,
    CANARY_TIME_LIMIT,
    CHECKPOINT_TASK,
    COMPACT_TASK,
    DRIFT_TASK,
    ENCODER_MIGRATION_TASK,
    FLOOD_TASK,
    HOLDS_TASK,
    JOB_TASK,
    JOB_TIME_LIMIT,
    RECONCILE_TASK,
    RECOVER_JOBS_TASK,
    SCREEN_TASK,
    get_app,
)
from workers.dispatch import (
    CANARY_LISTENER,
    CeleryDispatcher,
    CeleryJobRunner,
    CeleryShardSearch,
    canary_requester,
)

logger = logging.getLogger(__name__)

app = get_app()
_runtime: Runtime | None = None
_state: WorkerState | None = None
_screens = True  # set in the main process before fork: does this worker consume "screening"?


def runtime() -> Runtime:
    """This process's runtime, with the Celery dispatcher attached to its sessions."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(app.conf.moderation_settings)
        attach_dispatcher(_runtime.sessions, CeleryDispatcher(app))
        if _runtime.settings.effective_redis_url:
            # Wakes the web tier's ?wait= requests (moderation.service.waits).
            publish_done_uploads(_runtime.sessions, _runtime.settings.effective_redis_url)
        add_change_listener(canary_requester(app), key=CANARY_LISTENER)
        settings = _runtime.settings
        if settings.index_shards > 1:
            # Screening searches go to the shard workers (moderation.banks.shards).
            _runtime.shard_search = CeleryShardSearch(
                app, settings.index_shards, settings.shard_search_timeout
            )
    return _runtime


def worker_state() -> WorkerState:
    """This process's screener state (encoder loaded, snapshot decrypted, watcher running)."""
    global _state
    if _state is None:
        rt = runtime()
        _state = WorkerState(rt, poll_interval=rt.settings.snapshot_poll_interval)
        _state.refresh()
        _state.start_watcher()
    return _state


def consumed_queues(sender: Any) -> list[str] | None:
    """The names of the queues a starting worker (``worker_init``'s sender) consumes; None
    when it does not say (every queue)."""
    queues = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None) if queues is not None else None
    return None if consumed is None else [str(name) for name in consumed]


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _record_queues(sender: Any = None, **_: Any) -> None:
    global _screens
    consumed = consumed_queues(sender)
    _screens = consumed is None or "screening" in consumed


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _init_process(**_: Any) -> None:
    if _screens:
        worker_state()


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _process_gone(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


@app.task(  # type: ignore[untyped-decorator]
    name=SCREEN_TASK,
    autoretry_for=(RetryLater, SQLAlchemyError),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=None,
)
def screen(upload_id: str) -> str:
    """Screen one upload and record its result (idempotent by upload id), together with up to
    ``worker_batch_size - 1`` fresh queued uploads in one encoder batch (their own tasks then
    find them done; see ``moderation.service.queue.process_upload``)."""
    state = worker_state()
    settings = state.runtime.settings
    done = process_upload(
        state.runtime,
        upload_id,
        state.screener,
        max_attempts=settings.max_attempts,
        batch_size=settings.worker_batch_size,
        batch_wait=settings.worker_batch_wait_ms / 1000.0,
        shadow=state.shadow,
    )
    return done.outcome.value


@app.task(  # type: ignore[untyped-decorator]
    name=CALLBACK_TASK,
    autoretry_for=(SQLAlchemyError,),
    retry_backoff=2,
    max_retries=None,
)
def deliver(delivery_id: str) -> str:
    """One signed delivery attempt; the next one is scheduled after the backoff."""
    rt = runtime()
    outcome = deliver_callback(rt, delivery_id)
    # Countdowns past half the visibility timeout would be redelivered early by Redis: leave
    # those to the reconciler, which sends overdue deliveries.
    retry_in = outcome.retry_in if outcome.state == "retry" else None
    if retry_in is not None and retry_in < rt.settings.visibility_timeout / 2:
        CeleryDispatcher(app).send_callback(delivery_id, countdown=retry_in)
    return outcome.state


@app.task(name=RECONCILE_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def reconcile_stuck() -> dict[str, int]:
    """Re-send uploads and callbacks stuck past ``reconcile_after``."""
    rt = runtime()
    report = reconcile(rt, CeleryDispatcher(app), stuck_after=rt.settings.reconcile_after)
    return {"screenings": len(report.screenings), "callbacks": len(report.callbacks)}


@app.task(name=CHECKPOINT_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def audit_checkpoint() -> int | None:
    """Sign the audit chain head when enough events (or enough time) passed since the last."""
    rt = runtime()
    with transaction(rt.sessions) as session:
        checkpoint = checkpoint_if_due(
            session,
            rt.keyring,
            every=rt.settings.audit_checkpoint_every,
            max_age=timedelta(seconds=rt.settings.audit_checkpoint_max_age),
        )
        return None if checkpoint is None else checkpoint.seq


@app.task(name=FLOOD_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def flood_control() -> list[str]:
    """Quarantine entries over the policy's flood-control threshold today; their ids."""
    return [figures.entry_id for figures in check_flood(runtime(), actor="flood_control")]


@app.task(name=ENCODER_MIGRATION_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def encoder_migration() -> dict[str, Any] | None:
    """Go on with a running encoder migration for most of one task time limit (beat sends this
    every ``ENCODER_MIGRATION_INTERVAL``; a run lost with its worker is resumed by the next)."""
    rt = runtime()
    progress = resume_migration(rt, max_seconds=0.6 * rt.settings.task_time_limit)
    return None if progress is None else {"state": progress.state, "done": progress.done}


@app.task(  # type: ignore[untyped-decorator]
    name=CANARY_TASK,
    acks_late=False,
    time_limit=CANARY_TIME_LIMIT,
    soft_time_limit=CANARY_TIME_LIMIT - 60,
    autoretry_for=(SQLAlchemyError,),
    max_retries=3,
)
def canary(reason: str = "schedule", force: bool = True) -> dict[str, Any] | None:
    """Run the golden-set canary (when what it measures changed, or ``force``); its figures."""
    from moderation.modelops.canary import run_if_changed

    report = run_if_changed(runtime(), reason=reason, force=force)
    return None if report is None else report.to_json()


@app.task(name=DRIFT_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def drift() -> dict[str, float]:
    """Compare the last hour of uploads with the reference window; a drift score per signal."""
    from moderation.modelops.drift import run_drift

    return {s.signal: s.score for s in run_drift(runtime(), actor="drift").signals}


@app.task(name=COMPACT_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def compact_snapshots() -> list[int]:
    """Write delta snapshot chains that are due as full versions; the new versions."""
    from moderation.banks.compaction import compact_snapshots as compact

    return compact(runtime())


@app.task(name=HOLDS_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def release_holds() -> dict[str, int]:
    """Release legal holds that have ended; erase held uploads of erased subjects they kept."""
    return release_expired_holds(runtime(), actor="scheduler")


@app.task(  # type: ignore[untyped-decorator]
    name=JOB_TASK,
    autoretry_for=(SQLAlchemyError,),
    retry_backoff=2,
    max_retries=5,
    time_limit=JOB_TIME_LIMIT,
    soft_time_limit=JOB_TIME_LIMIT - 60,
)
def run_console_job(job_id: str) -> None:
    """Run one queued console import job (a job in any other state is left alone); an import
    may run for up to ``JOB_TIME_LIMIT`` seconds, not the screening tasks' limit. A redelivery
    while it runs (past Redis's visibility timeout) finds the job ``running`` and does nothing."""
    run_job(runtime(), job_id)


@app.task(name=RECOVER_JOBS_TASK, autoretry_for=(SQLAlchemyError,), max_retries=3)  # type: ignore[untyped-decorator]
def recover_jobs() -> list[str]:
    """Send again the console import jobs a restart lost (queued unsent, or stalled running)."""
    ids = lost_jobs(runtime())
    runner = CeleryJobRunner(app)
    for job_id in ids:
        runner.submit(job_id)
    return ids
