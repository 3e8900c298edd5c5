"""The Celery implementation of :class:`moderation.service.dispatch.Dispatcher`: sends tasks by
name."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from celery import Celery, group
from celery.exceptions import TimeoutError as CeleryTimeoutError

from moderation.banks.shards import ShardAnswer, ShardUnavailable, encode_queries
from workers.celery_app import (
    CALLBACK_TASK,
    CANARY_TASK,
    JOB_TASK,
    ROUTES,
    SCREEN_TASK,
    SHARD_TASK,
    shard_queue,
)

logger = logging.getLogger(__name__)


class CeleryDispatcher:
    """Sends ``moderation.screen`` and ``moderation.deliver_callback`` through ``app``.

    Tasks are sent by name, so the sender never imports the task code (or torch).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_screening(self, upload_id: str) -> None:
        """Queue the screening task (raises when the broker is unreachable)."""
        self.app.send_task(SCREEN_TASK, args=[upload_id], **ROUTES[SCREEN_TASK])

    def send_callback(self, delivery_id: str, countdown: float = 0.0) -> None:
        """Queue one delivery attempt, after ``countdown`` seconds."""
        self.app.send_task(
            CALLBACK_TASK,
            args=[delivery_id],
            countdown=countdown or None,
            **ROUTES[CALLBACK_TASK],
        )


class CeleryJobRunner:
    """A :class:`moderation.banks.jobs.JobRunner` that hands console import jobs to a Celery
    worker (``moderation.run_job``): nothing is imported in the web process.

    A failed send is logged, not raised: the job row stays ``queued`` and the beat task
    ``moderation.recover_jobs`` sends it again (:mod:`moderation.banks.job_recovery`).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def submit(self, job_id: str) -> None:
        try:
            self.app.send_task(JOB_TASK, args=[job_id], **ROUTES[JOB_TASK])
        except Exception:
            logger.warning("sending job %s failed; recovery will re-send it", job_id, exc_info=True)


CANARY_LISTENER = "celery-canary"
"""The key of the canary requester among a process's change listeners (one per process)."""


def canary_requester(app: Celery) -> Callable[[str], None]:
    """A model-change listener (:func:`moderation.service.model_events.add_change_listener`)
    that queues a canary run for ``reason``; the run is skipped when nothing it measures
    changed (``moderation.modelops.canary.run_if_changed``)."""

    def request(reason: str) -> None:
        app.send_task(CANARY_TASK, args=[reason, False], **ROUTES[CANARY_TASK])

    return request


# Seconds between the gather's checks for answers. Celery's default (0.5 s) put a constant half
# second on every screening (measured: fan-out p50 523 ms at 0.5 s); answers take milliseconds.
GATHER_INTERVAL = 0.005


class CeleryShardSearch:
    """A :class:`moderation.banks.shards.ShardSearch` over Celery: one ``moderation.shard_search``
    task per shard on its queue (``shard-i``), sent as a group and gathered from the Redis
    result backend with a bounded wait of ``timeout`` seconds.

    The tasks expire after ``timeout``: a shard that comes back later does not work through
    searches nobody waits for any more. Gathering inside the screening task is safe from the
    deadlock Celery warns of (``disable_sync_subtasks``) because shard tasks run only on the
    shard workers, never in a screening worker's slots.
    """

    def __init__(self, app: Celery, shards: int, timeout: float) -> None:
        self.app = app
        self.shards = shards
        self.timeout = timeout

    def __call__(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        threshold: float,
        snapshot_id: str | None,
    ) -> list[ShardAnswer]:
        """Every shard's answer. Raises ShardUnavailable naming the shards that did not answer
        in time or failed."""
        payload = encode_queries(queries)
        sigs = [
            self.app.signature(
                SHARD_TASK,
                args=[i, snapshot_id, payload, k, threshold],
                queue=shard_queue(i),
                expires=self.timeout,
            )
            for i in range(self.shards)
        ]
        try:
            result = group(sigs).apply_async()
        except Exception as exc:  # broker down: the screening task retries
            raise ShardUnavailable(f"could not send the shard searches: {exc}") from exc
        try:
            values = result.get(
                timeout=self.timeout,
                propagate=False,
                disable_sync_subtasks=False,
                interval=GATHER_INTERVAL,
            )
        except CeleryTimeoutError:
            missing = [i for i, r in enumerate(result.results) if not r.successful()]
            raise ShardUnavailable(
                f"shard(s) {missing} did not answer within {self.timeout:g} s"
            ) from None
        finally:
            result.forget()
        return _answers(values)


def _answers(values: list[object]) -> list[ShardAnswer]:
    """Parse the shards' results (in shard order); raise ShardUnavailable for failed ones."""
    answers, failed = [], []
    for shard, value in enumerate(values):
        try:
            if not isinstance(value, dict):
                raise ValueError(f"{type(value).__name__}: {value}")
            answers.append(ShardAnswer.from_json(value))
        except ValueError as exc:
            failed.append(f"shard {shard} failed: {exc}")
    if failed:
        raise ShardUnavailable("; ".join(failed))
    return answers
