"""What the web tier and the Celery app know of the screening workers without loading one.

:func:`worker_reports` reads the workers' heartbeats back for readiness (``/readyz``, the status
page, the health gauges); :func:`check_reliability` refuses Celery settings that could lose a
task (RELIABILITY.md Q5). The worker itself is :mod:`moderation.service.worker`; this module
imports neither the encoder nor the blocklist, so ``moderation serve`` does not either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.versions import current_snapshot
from moderation.storage.models import WorkerHeartbeat


def seconds_since(value: datetime) -> float:
    """Seconds from ``value`` (naive values are taken as UTC) to now."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (datetime.now(UTC) - value).total_seconds()


def check_reliability(effective: Mapping[str, Any]) -> list[str]:
    """Problems with a worker's effective Celery settings; empty when safe to start.

    Expected keys: ``visibility_timeout``, ``task_time_limit``, ``task_soft_time_limit``,
    ``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier``,
    ``task_serializer``, ``accept_content``. The rules come from RELIABILITY.md (Q5 and the
    known facts above its table): celery #1628 (acks_late alone acknowledges a task whose child
    was killed), and Redis redelivering any task still running after ``visibility_timeout``.
    """
    problems: list[str] = []
    visibility = effective.get("visibility_timeout")
    limit = effective.get("task_time_limit")
    soft = effective.get("task_soft_time_limit")
    if limit is None:
        problems.append("task_time_limit is unset: a hung task would hold its worker forever")
    elif visibility is not None and visibility <= limit:
        problems.append(
            f"visibility_timeout ({visibility} s) must exceed task_time_limit ({limit} s): "
            "otherwise Redis redelivers tasks that are still running"
        )
    if soft is not None and limit is not None and soft >= limit:
        problems.append(
            f"task_soft_time_limit ({soft} s) must be below task_time_limit ({limit} s)"
        )
    if not effective.get("task_acks_late"):
        problems.append("task_acks_late must be on: a crashed task would be lost")
    if not effective.get("task_reject_on_worker_lost"):
        problems.append(
            "task_reject_on_worker_lost must be on: with acks_late alone a task whose child "
            "process is SIGKILLed is acknowledged and lost (celery #1628)"
        )
    if effective.get("worker_prefetch_multiplier") != 1:
        problems.append(
            f"worker_prefetch_multiplier is {effective.get('worker_prefetch_multiplier')}, "
            "must be 1: prefetched tasks wait behind a slow one"
        )
    if effective.get("task_serializer") != "json" or set(effective.get("accept_content") or ()) != {
        "json"
    }:
        problems.append("tasks must be serialised as JSON only (no pickle)")
    return problems


@dataclass(frozen=True)
class WorkerReport:
    """One worker's heartbeat as readiness shows it."""

    worker_id: str
    encoder_id: str | None
    snapshot_version: int | None
    error: str | None
    seen_s_ago: float
    stale_s: float | None


def worker_reports(session: Session, *, alive_within: float) -> tuple[int, list[WorkerReport]]:
    """The current snapshot version and the workers heard from within ``alive_within`` s.

    ``stale_s`` is how long the current version has existed while the worker still runs an
    older one (0 when up to date, None without a snapshot loaded).
    """
    row = current_snapshot(session)
    current = 0 if row is None else row.version
    created = None if row is None else row.created_at
    since = datetime.now(UTC) - timedelta(seconds=alive_within)
    reports = []
    for beat in session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.updated_at >= since)
        .order_by(WorkerHeartbeat.id)
    ):
        stale: float | None
        if beat.snapshot_version is None:
            stale = None
        elif beat.snapshot_version >= current or created is None:
            stale = 0.0
        else:
            stale = max(0.0, seconds_since(created))
        reports.append(
            WorkerReport(
                worker_id=beat.id,
                encoder_id=beat.encoder_id,
                snapshot_version=beat.snapshot_version,
                error=beat.error,
                seen_s_ago=max(0.0, seconds_since(beat.updated_at)),
                stale_s=stale,
            )
        )
    return current, reports
