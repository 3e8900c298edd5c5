"""The Celery app, built only from :class:`~moderation.config.Settings` (STYLE.md rules 5, 13, 14).

``celery -A workers.celery_app:app worker`` (what ``moderation worker`` runs) loads settings from
the environment like every other entry point. The broker is ``MODERATION_BROKER_URL`` (Redis in
production); without it, kombu's SQLAlchemy transport over ``<data_dir>/broker.sqlite`` carries
the same tasks on one machine (no Redis needed).

Reliability settings (RELIABILITY.md Q1-Q5): late acknowledgement, reject-on-worker-lost, one
prefetched task per process, JSON only, time limits below Redis's visibility timeout. The worker
logs these at start and exits (code 3) when they are unsafe.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from moderation.config import ConfigurationError, Settings, load_settings
from moderation.service.worker_health import check_reliability

logger = logging.getLogger(__name__)

SCREEN_TASK = "moderation.screen"
CALLBACK_TASK = "moderation.deliver_callback"
RECONCILE_TASK = "moderation.reconcile"
CHECKPOINT_TASK = "moderation.audit_checkpoint"
FLOOD_TASK = "moderation.flood_control"
ENCODER_MIGRATION_TASK = "moderation.encoder_migrate"
HOLDS_TASK = "moderation.release_holds"
JOB_TASK = "moderation.run_job"
RECOVER_JOBS_TASK = "moderation.recover_jobs"
# How often beat releases legal holds that have ended (and erases held uploads of erased subjects
# no hold keeps): holds are days long, so an hour late at most is well inside any legal period.
HOLDS_INTERVAL = 3600.0
# Hard time limit of one console import job, seconds: a large zip (tens of thousands of images)
# embeds for hours on CPU; the screening tasks' task_time_limit is far too short for it.
JOB_TIME_LIMIT = 6 * 3600
# How often beat re-queues console import jobs lost to a restart (moderation.banks.job_recovery).
RECOVER_JOBS_INTERVAL = 60.0
CANARY_TASK = "moderation.canary"
DRIFT_TASK = "moderation.drift"
# How often beat asks whether the snapshot, classifier model, policy or encoder changed since the
# last canary run (a cheap comparison; the run itself only when something changed): changes made
# where no listener enqueues a run (a CLI import) are measured within this bound.
CANARY_CHECK_INTERVAL = 60.0
# A canary run screens the whole golden set (minutes on a CPU for a few thousand images): it gets
# its own time limit and is acknowledged on receipt, so the screening tasks' limit never kills it
# into an endless redelivery; a run lost to a crash is redone by the next change check.
CANARY_TIME_LIMIT = 3600
# Drift compares the last hour of uploads with the reference window, once an hour (issue 18).
DRIFT_INTERVAL = 3600.0
# How often beat runs the flood-control check (noisy-entry quarantine): a flooding entry sends at
# most a few minutes of matches to review (or blocks) before it is quarantined.
FLOOD_INTERVAL = 300.0
# How often beat sends the encoder-migration job: each run goes on with a running migration for
# most of one task time limit, and a run lost with its worker is resumed at the next tick.
ENCODER_MIGRATION_INTERVAL = 15.0
# How often beat asks for an audit checkpoint; checkpoint_if_due decides whether one is due.
CHECKPOINT_INTERVAL = 60.0
SHARD_TASK = "moderation.shard_search"
# A shard answers one search in milliseconds; a shard task still running past this was stuck,
# and the screening task that sent it stopped waiting long before (shard_search_timeout).
SHARD_TIME_LIMIT = 30
# Shard answers wait in Redis for the screening task's gather; nobody reads them later.
SHARD_RESULT_EXPIRES = 300
# The snapshot compaction job (moderation.banks.compaction): every snapshot_compact_interval s.
COMPACT_TASK = "moderation.compact_snapshots"
QUEUES = ("screening", "maintenance", "callbacks")
ROUTES = {
    SCREEN_TASK: {"queue": "screening"},
    CALLBACK_TASK: {"queue": "callbacks"},
    RECONCILE_TASK: {"queue": "maintenance"},
    FLOOD_TASK: {"queue": "maintenance"},
    ENCODER_MIGRATION_TASK: {"queue": "maintenance"},
    HOLDS_TASK: {"queue": "maintenance"},
    JOB_TASK: {"queue": "maintenance"},
    RECOVER_JOBS_TASK: {"queue": "maintenance"},
    CANARY_TASK: {"queue": "maintenance"},
    DRIFT_TASK: {"queue": "maintenance"},
    COMPACT_TASK: {"queue": "maintenance"},
}
UNSAFE_EXIT = 3


def is_redis(url: str) -> bool:
    """True for ``redis://``, ``rediss://`` and ``redis+socket://`` broker URLs."""
    return url.startswith(("redis://", "rediss://", "redis+socket://"))


def _transport_options(settings: Settings, broker: str) -> dict[str, Any]:
    if is_redis(broker):
        return {
            "visibility_timeout": settings.visibility_timeout,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        }
    # Options go straight to SQLAlchemy's create_engine for this transport.
    return {"connect_args": {"timeout": 30}}


def shard_queue(shard: int) -> str:
    """The queue of shard ``shard``'s workers (``moderation worker --shard i``)."""
    return f"shard-{shard}"


def _shard_config(settings: Settings) -> dict[str, Any]:
    """The settings sharded cosine search adds (``index_shards`` > 1): one queue per shard
    and a Redis result backend, through which the screening task gathers the shards' answers.

    Raises:
        ConfigurationError: sharding without Redis.
    """
    if settings.index_shards < 2:
        return {}
    redis_url = settings.effective_redis_url
    if redis_url is None:
        raise ConfigurationError(
            "MODERATION_INDEX_SHARDS > 1 needs Redis (MODERATION_BROKER_URL or "
            "MODERATION_REDIS_URL): the shards' answers are gathered through it"
        )
    shard_queues = [Queue(shard_queue(i)) for i in range(settings.index_shards)]  # type: ignore[no-untyped-call]
    return {
        "result_backend": redis_url,
        "result_expires": SHARD_RESULT_EXPIRES,
        "task_queues": [Queue(name) for name in QUEUES] + shard_queues,  # type: ignore[no-untyped-call]
    }


def _every(task: str, seconds: float, args: list[Any] | None = None) -> dict[str, Any]:
    """A beat entry: ``task`` (with ``args``) on the maintenance queue every ``seconds``; a run
    not started by the next one expires."""
    entry: dict[str, Any] = {
        "task": task,
        "schedule": seconds,
        "options": {"queue": "maintenance", "expires": seconds},
    }
    if args is not None:
        entry["args"] = args
    return entry


def _beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        "reconcile": _every(RECONCILE_TASK, float(settings.reconcile_interval)),
        "audit-checkpoint": _every(CHECKPOINT_TASK, CHECKPOINT_INTERVAL),
        "flood-control": _every(FLOOD_TASK, FLOOD_INTERVAL),
        "release-holds": _every(HOLDS_TASK, HOLDS_INTERVAL),
        "recover-jobs": _every(RECOVER_JOBS_TASK, RECOVER_JOBS_INTERVAL),
        "encoder-migration": _every(ENCODER_MIGRATION_TASK, ENCODER_MIGRATION_INTERVAL),
        "canary": _every(CANARY_TASK, float(settings.canary_interval), ["schedule", True]),
        "canary-change-check": _every(CANARY_TASK, CANARY_CHECK_INTERVAL, ["change", False]),
        "drift": _every(DRIFT_TASK, DRIFT_INTERVAL),
        "compact-snapshots": _every(COMPACT_TASK, float(settings.snapshot_compact_interval)),
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting the service uses, derived from ``settings``."""
    broker = settings.effective_broker_url
    limit = settings.task_time_limit
    return {
        "broker_url": broker,
        "broker_transport_options": _transport_options(settings, broker),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # workers reconnect on their own (Q4)
        "broker_connection_timeout": 5,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": limit,
        "task_soft_time_limit": max(1, int(limit * 0.9)) if limit > 1 else None,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_enable_remote_control": is_redis(broker),
        "worker_send_task_events": False,
        # Loading torch, the encoder and the snapshot in a new child takes seconds on a busy CPU.
        "worker_proc_alive_timeout": 120,
        "task_queues": [Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        "task_default_queue": "screening",
        "task_routes": ROUTES,
        # A failed publish gives up quickly: the row is committed and the reconciler re-sends.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.4,
            "interval_max": 1.0,
        },
        "beat_schedule": _beat_schedule(settings),
        "beat_schedule_filename": str(settings.resolved_data_dir / "celerybeat-schedule"),
        "include": ["workers.tasks", "workers.shards"],
    } | _shard_config(settings)


def effective_reliability(app: Celery) -> dict[str, Any]:
    """The settings RELIABILITY.md Q5 asks the worker to log (and :func:`check_reliability`
    judges), read back from the app's final configuration."""
    conf = app.conf
    transport = conf.broker_transport_options or {}
    settings: Settings | None = conf.get("moderation_settings")
    visibility = transport.get("visibility_timeout")
    if visibility is None and settings is not None:
        visibility = settings.visibility_timeout
    return {
        "broker": conf.broker_url.split("@")[-1],
        "visibility_timeout": visibility,
        "task_time_limit": conf.task_time_limit,
        "task_soft_time_limit": conf.task_soft_time_limit,
        "task_acks_late": conf.task_acks_late,
        "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "task_serializer": conf.task_serializer,
        "accept_content": list(conf.accept_content),
        "max_attempts": None if settings is None else settings.max_attempts,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: from the environment)."""
    settings = settings or load_settings()
    app = Celery("moderation", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.moderation_settings = settings
    return app


_app: Celery | None = None


def get_app() -> Celery:
    """The process-wide app built from the environment's settings (created on first use)."""
    global _app
    if _app is None:
        _app = create_celery()
        _app.set_current()
    return _app


def __getattr__(name: str) -> Any:
    # `celery -A workers.celery_app:app` resolves `app` lazily, so importing this module (the
    # web app does, to build its own app from its own settings) reads no environment.
    if name == "app":
        return get_app()
    raise AttributeError(name)


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    # Connecting here tells Celery to leave logging to us: one format for every entry point.
    settings = get_app().conf.moderation_settings
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    for name in ("moderation", "workers", "celery"):
        logging.getLogger(name).setLevel(settings.log_level)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _check_worker_settings(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None) or get_app()
    effective = effective_reliability(app)
    logger.warning(
        "worker reliability settings: %s",
        ", ".join(f"{k}={v}" for k, v in effective.items()),
    )
    problems = check_reliability(effective)
    if problems:
        for problem in problems:
            logger.critical("unsafe worker configuration: %s", problem)
        sys.stderr.write(
            "refusing to start: unsafe worker configuration: " + "; ".join(problems) + "\n"
        )
        sys.stderr.flush()
        raise SystemExit(UNSAFE_EXIT)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _serve_worker_metrics(sender: Any = None, **_: Any) -> None:
    """Serve this worker's metrics on MODERATION_WORKER_METRICS_PORT (workers/metrics_server)."""
    settings = get_app().conf.moderation_settings
    if settings.worker_metrics_port is None:
        return
    if settings.metrics_token is None:
        logger.error("MODERATION_WORKER_METRICS_PORT is set without MODERATION_METRICS_TOKEN: "
                     "worker metrics are not served")  # fmt: skip
        return
    from workers.metrics_server import serve_metrics

    serve_metrics(settings.worker_metrics_port, settings.metrics_token.get_secret_value())
