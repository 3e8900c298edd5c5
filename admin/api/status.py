"""Readiness (``/status``), liveness (``/status/live``) and Prometheus ``/metrics``.

Public, and minimal: ``/status/live`` (``{"status": "ok"}``) and ``/status/ready``
(``{"ready": bool}``, 200/503). ``/metrics`` and the detailed ``/status`` (worker ids, encoder
ids, snapshot versions) need ``Authorization: Bearer <MODERATION_METRICS_TOKEN>``
(:func:`metrics_token_required`); with no token configured they are not served (404).

Readiness (STYLE.md rule 12) is true when the database and the broker answer and at least one
worker reported, within the last few poll intervals, an encoder loaded and the current snapshot
version decrypted and verified (or a version older by less than the reload bound); a worker
reporting a snapshot it cannot decrypt or verify makes the service not ready (503).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text

from admin.api.services import services
from moderation.governance.health_metrics import HealthSamples, health_samples
from moderation.modelops.encoder_status import migration_progress
from moderation.modelops.gauges import ModelOpsCollector
from moderation.service.metrics import bearer_token_matches, database_samples
from moderation.service.runtime import Runtime
from moderation.service.worker_health import worker_reports

logger = logging.getLogger(__name__)

bp = Blueprint("status", __name__)

RELOAD_BOUND_S = 30.0  # a worker must reload a new snapshot within this (issue 3)


def _runtime() -> Runtime:
    from admin import runtime

    return runtime()


def _check_database(runtime: Runtime) -> dict[str, Any]:
    try:
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}


def _check_broker() -> dict[str, Any]:
    celery = services().celery
    if celery is None:
        return {"ok": True, "detail": "no broker (in-memory dispatcher)"}
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return {"ok": True, "transport": conn.transport_cls}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}


def _queue_depths() -> dict[str, int]:
    celery = services().celery
    if celery is None:
        return {}
    from workers.celery_app import QUEUES

    depths: dict[str, int] = {}
    with celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        channel = conn.default_channel
        # kombu's virtual transports (Redis, SQLAlchemy) count a queue with `_size`, which is
        # 0 for a queue never used; a passive declare would fail on those.
        size = getattr(channel, "_size", None)
        for name in QUEUES:
            if size is not None:
                depths[name] = int(size(name))
            else:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
    return depths


def metrics_token_required(view: Callable[[], Any]) -> Callable[[], Any]:
    """Serve ``view`` only to ``Authorization: Bearer <MODERATION_METRICS_TOKEN>``: 404 when no
    token is configured (not served at all), 401 for a missing or wrong token. The comparison
    is constant-time (``hmac.compare_digest``)."""

    @functools.wraps(view)
    def wrapped() -> Any:
        expected = _runtime().settings.metrics_token
        if expected is None:
            return _json_error(404, "not_found", "not served: MODERATION_METRICS_TOKEN is unset")
        authorization = request.headers.get("Authorization", "")
        if not bearer_token_matches(authorization, expected.get_secret_value()):
            response = _json_error(401, "unauthorized", "the metrics bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        return view()

    return wrapped


def _json_error(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


@bp.get("/status/live")
def live() -> Any:
    """Liveness, public: the process answers; ``{"status": "ok"}`` and nothing else."""
    return jsonify({"status": "ok"})


@bp.get("/status/ready")
def ready() -> Any:
    """Readiness, public: ``{"ready": bool}`` only, 200 or 503 (the reasons are on the
    token-protected ``/status``)."""
    is_ready, _ = _readiness()
    return jsonify({"ready": is_ready}), 200 if is_ready else 503


@bp.get("/status")
@metrics_token_required
def status() -> Any:
    """Readiness with the reasons (workers, versions, staleness); 503 when not ready. Needs the
    metrics bearer token."""
    is_ready, checks = _readiness()
    response = jsonify({"ready": is_ready, "checks": checks})
    response.status_code = 200 if is_ready else 503
    return response


def _readiness() -> tuple[bool, dict[str, Any]]:
    """(ready, the checks of the database, the broker and the workers' snapshots)."""
    runtime = _runtime()
    database = _check_database(runtime)
    broker = _check_broker()
    snapshot: dict[str, Any] = {"ok": False}
    if database["ok"]:
        try:
            snapshot = _check_snapshot(runtime)
        except Exception as exc:
            snapshot = {"ok": False, "error": type(exc).__name__}
    ready = bool(database["ok"] and broker["ok"] and snapshot["ok"])
    return ready, {"database": database, "broker": broker, "snapshot": snapshot}


def _check_snapshot(runtime: Runtime) -> dict[str, Any]:
    """At least one worker fresh on the current snapshot and none failing to read it."""
    alive_within = max(3 * runtime.settings.snapshot_poll_interval, 30.0)
    with runtime.sessions() as session:
        current, reports = worker_reports(session, alive_within=alive_within)
    workers = [
        {
            "id": r.worker_id,
            "encoder_loaded": r.encoder_id is not None,
            "encoder_id": r.encoder_id,
            "snapshot_version": r.snapshot_version,
            "stale_s": None if r.stale_s is None else round(r.stale_s, 1),
            "seen_s_ago": round(r.seen_s_ago, 1),
            "error": r.error,
        }
        for r in reports
    ]
    errors = [r for r in reports if r.error]
    fresh = [
        r
        for r in reports
        if r.error is None
        and r.encoder_id is not None
        and r.stale_s is not None
        and r.stale_s <= RELOAD_BOUND_S
    ]
    snapshot: dict[str, Any] = {
        "ok": bool(fresh) and not errors,
        "current_version": current,
        "workers": workers,
    }
    if not reports:
        snapshot["detail"] = "no worker has reported (is `moderation worker` running?)"
    elif errors:
        snapshot["detail"] = "a worker cannot decrypt or verify the snapshot"
    return snapshot


def _labelled(
    family: GaugeMetricFamily | CounterMetricFamily, counts: Mapping[str, float]
) -> Metric:
    """``family`` with one sample per label value of ``counts``, in label order."""
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


class _ScrapeCollector(Collector):
    """Figures read at scrape time: database counts and queue depths (true fleet-wide)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _health(self) -> Iterator[Metric]:
        settings = self.runtime.settings
        yield GaugeMetricFamily(
            "moderation_queue_max_depth",
            "Uploads queued or processing past which the upload hook answers 503 "
            "(MODERATION_QUEUE_MAX_DEPTH).",
            value=settings.queue_max_depth,
        )
        try:
            with self.runtime.sessions() as session:
                health = health_samples(
                    session,
                    self.runtime.keyring.key_ids,
                    alive_within=max(3 * settings.snapshot_poll_interval, 30),
                    overdue_days=settings.erasure_deadline_days,
                )
        except Exception as exc:
            logger.warning("metrics: operational ages unavailable: %s", exc)
            return
        yield from _health_families(health)

    def collect(self) -> Iterator[Metric]:
        try:
            with self.runtime.sessions() as session:
                samples = database_samples(session)
                migration = migration_progress(session)
                alive_within = max(3 * self.runtime.settings.snapshot_poll_interval, 30)
                current, reports = worker_reports(session, alive_within=alive_within)
        except Exception as exc:
            logger.warning("metrics: database unavailable: %s", exc)
            return
        yield _labelled(
            GaugeMetricFamily("moderation_uploads", "Uploads by status.", labels=["status"]),
            samples.uploads_by_status,
        )
        yield _labelled(
            CounterMetricFamily(
                "moderation_results", "Uploads by terminal state (decision).", labels=["decision"]
            ),
            samples.results_by_decision,
        )
        yield _labelled(
            CounterMetricFamily(
                "moderation_unscannable_results",
                "Unscannable results by reason (poison included).",
                labels=["reason"],
            ),
            samples.results_by_reason,
        )
        yield _labelled(
            GaugeMetricFamily(
                "moderation_callback_deliveries", "Callback deliveries by state.", labels=["state"]
            ),
            samples.callbacks_by_state,
        )
        yield GaugeMetricFamily("moderation_snapshot_version", "Current version.", value=current)
        progress = GaugeMetricFamily(
            "moderation_encoder_migration_progress_ratio",
            "Retained originals embedded by the newest encoder migration, of all (0-1).",
            labels=["target"],
        )
        for target, ratio in migration.items():
            progress.add_metric([target], ratio)
        yield progress
        yield GaugeMetricFamily(
            "moderation_workers_alive", "Workers heard from recently.", value=len(reports)
        )
        yield from self._health()
        try:
            depths = _queue_depths()
        except Exception as exc:
            logger.warning("metrics: broker unavailable: %s", exc)
            return
        depth = GaugeMetricFamily(
            "moderation_queue_depth", "Messages waiting per queue.", labels=["queue"]
        )
        for key, value in sorted(depths.items()):
            depth.add_metric([key], value)
        yield depth


def _health_families(health: HealthSamples) -> Iterator[Metric]:
    """The ages the alert rules watch (:mod:`moderation.governance.health_metrics`)."""
    yield GaugeMetricFamily(
        "moderation_oldest_queued_upload_seconds",
        "Age of the oldest upload still queued or processing (0 when none), seconds.",
        value=health.oldest_queued_upload_s,
    )
    labelled = (
        ("moderation_snapshot_age_seconds", "Age of the snapshot serving each enabled bank, s.",
         "bank", health.snapshot_age_s),
        ("moderation_worker_snapshot_lag_seconds", "How long a newer snapshot has existed "
         "while the worker still serves an older one (0 when current), s.", "worker",
         health.worker_lag_s),
        ("moderation_key_age_seconds", "Time since each master key became primary, s.", "key",
         health.key_age_s),
    )  # fmt: skip
    for name, documentation, label, values in labelled:
        yield _labelled(GaugeMetricFamily(name, documentation, labels=[label]), values)
    yield GaugeMetricFamily(
        "moderation_erasure_requests_overdue",
        "Open erasure requests past MODERATION_ERASURE_DEADLINE_DAYS (default 25; GDPR Art. "
        "12(3): one month).",
        value=health.overdue_erasures,
    )


@bp.get("/metrics")
@metrics_token_required
def metrics() -> Response:
    """Prometheus text format: this machine's processes (multiprocess mode) plus scrape-time
    figures from the database and the broker. Needs the metrics bearer token."""
    start = time.perf_counter()
    scrape = CollectorRegistry()
    scrape.register(_ScrapeCollector(_runtime()))
    scrape.register(ModelOpsCollector(_runtime()))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes)  # type: ignore[no-untyped-call]
        body = generate_latest(processes) + generate_latest(scrape)
    else:
        body = generate_latest(REGISTRY) + generate_latest(scrape)
    logger.debug("metrics scraped in %.1f ms", (time.perf_counter() - start) * 1000)
    return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")
