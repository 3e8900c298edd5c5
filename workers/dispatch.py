"""The Celery implementation of :class:`moderation.service.dispatch.Dispatcher`: sends tasks by
name."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery

from workers.celery_app import CALLBACK_TASK, CANARY_TASK, JOB_TASK, ROUTES, SCREEN_TASK

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
