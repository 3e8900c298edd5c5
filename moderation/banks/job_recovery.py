"""Console import jobs survive restarts: the job row is the queue's truth, the broker message a
reminder.

A console import (``bank.import``, ``bank.import_hashes``) is a
:class:`~moderation.storage.console.Job` row plus its sealed staged upload; the web process only
creates both and sends the job's id to a Celery worker (``workers.dispatch.CeleryJobRunner``),
never importing in a web thread. Two things can lose the work: the send (broker down, web
process killed right after the commit) and the run (the worker killed mid-import; the staged
upload is removed only when a run ends).
:func:`lost_jobs`, run every minute by the beat task ``moderation.recover_jobs``, finds both:
jobs still ``queued`` past :data:`RESEND_AFTER_S` are sent again, and jobs ``running`` without
progress for :data:`STALL_AFTER_S` go back to ``queued`` (audited ``job.requeue``; after
:data:`MAX_REQUEUES` stalls the job fails instead, ``job.abandon``) and are sent again.
Sending twice is harmless: :func:`moderation.banks.jobs.run_job` runs a job only from
``queued``, under a row lock, and an import commits its entries in one transaction at its end
(a rerun after that commit skips the images already in the bank).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.hash_jobs import HASH_IMPORT_KIND
from moderation.banks.job_staging import remove_staged
from moderation.banks.jobs import IMPORT_KIND
from moderation.storage.console import Job
from moderation.storage.db import transaction

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

RECOVERED_KINDS: tuple[str, ...] = (IMPORT_KIND, HASH_IMPORT_KIND)
RESEND_AFTER_S = 300.0
"""A job still queued this long after its last send is sent again (its message was lost, or is
waiting behind others: a duplicate does nothing)."""
STALL_AFTER_S = 600.0
"""A running job whose progress has not changed for this long lost its worker (the same limit
:func:`moderation.banks.jobs.job_view` reports as stalled; progress is written every few
seconds while a job runs)."""
MAX_REQUEUES = 3
"""Stalled runs re-queued per job; the next stall fails it (it would kill every worker)."""


def _requeue(session: Session, job: Job, actor: str) -> bool:
    """Put a stalled job back to ``queued`` (audited ``job.requeue``); after
    :data:`MAX_REQUEUES` it fails instead (an import that kills its worker every time). True
    when re-queued."""
    requeues = int(job.params.get("requeues", 0)) + 1
    if requeues > MAX_REQUEUES:
        job.state = "failed"
        job.result = {"error": f"the job lost its worker {MAX_REQUEUES + 1} times; not retried"}
    else:
        job.state = "queued"
        job.params = {**job.params, "requeues": requeues}
    record_event(
        session,
        actor=actor,
        action="job.requeue" if job.state == "queued" else "job.abandon",
        target=f"job:{job.id}",
        details={"kind": job.kind, "progress": job.progress, "requeues": requeues},
    )
    return job.state == "queued"


def lost_jobs(
    runtime: Runtime,
    *,
    actor: str = "job_recovery",
    now: datetime | None = None,
    resend_after_s: float = RESEND_AFTER_S,
    stall_after_s: float = STALL_AFTER_S,
) -> list[str]:
    """Ids of import jobs to send (again): queued ones not sent for ``resend_after_s`` seconds
    and running ones stalled for ``stall_after_s`` (put back to ``queued``, audited
    ``job.requeue``). Each returned job's ``updated_at`` is set to now, so it is sent again only
    after another ``resend_after_s``."""
    moment = now or datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.kind.in_(RECOVERED_KINDS), Job.state.in_(("queued", "running")))
            .order_by(Job.created_at)
            .with_for_update(skip_locked=True)
        ).all()
        found: list[str] = []
        abandoned: list[dict[str, Any]] = []
        for job in jobs:
            updated = (
                job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=UTC)
            )
            idle = moment - updated
            if job.state == "running" and idle > timedelta(seconds=stall_after_s):
                if not _requeue(session, job, actor):
                    abandoned.append(dict(job.params))
                    continue
            elif not (job.state == "queued" and idle > timedelta(seconds=resend_after_s)):
                continue
            job.updated_at = moment
            found.append(job.id)
    for params in abandoned:
        remove_staged(runtime.settings, params)
    if found:
        logger.warning("re-sending %d console import jobs lost to a restart", len(found))
    return found
