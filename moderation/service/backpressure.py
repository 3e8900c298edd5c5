"""Queue-depth bound of the upload hook: refuse new uploads while too many wait (RELIABILITY.md S3).

The depth is the number of uploads accepted but not yet screened: rows ``queued`` or
``processing``. It is counted from the ``uploads`` table itself (its ``status`` index), not kept
in a counter, so it is right after any crash: a worker killed mid-screening leaves its upload
``processing`` (still counted) until a redelivery or the reconciler ends it ``done``; nothing can
leave a counter too high or too low. Each count stops at the bound (``LIMIT``), so a check costs
at most ``bound`` index entries however long the backlog is.

:func:`admit_upload` runs in the submitting transaction before anything is stored, so a refused
upload leaves no row and no blob; an accepted one is a committed row the workers (or the
reconciler) will screen. Concurrent requests can each see ``bound - 1`` and both be accepted:
the bound is exceeded by at most the number of requests in flight at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.service.metrics import UPLOADS_REFUSED
from moderation.storage.models import Upload

#: Upload states that wait for a worker (``moderation.service.queue``: queued -> processing ->
#: done).
IN_FLIGHT = ("queued", "processing")


@dataclass
class QueueFullError(Exception):
    """The queue is at its bound: the upload was refused before anything was stored.

    ``status`` is 503 for the global bound (the service as a whole is saturated) and 429 for the
    client's own share (this client should slow down; others are still accepted);
    ``retry_after`` is in seconds.
    """

    status: int
    code: str
    message: str
    retry_after: int

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Depth:
    """In-flight uploads counted up to ``bound`` (a count equal to ``bound`` means "at least")."""

    count: int
    bound: int

    @property
    def full(self) -> bool:
        """Whether the count reached the bound."""
        return self.count >= self.bound


def in_flight(session: Session, bound: int, client_id: int | None = None) -> Depth:
    """Uploads ``queued`` or ``processing`` (of ``client_id`` when given), counted up to
    ``bound``."""
    rows = select(Upload.id).where(Upload.status.in_(IN_FLIGHT))
    if client_id is not None:
        rows = rows.where(Upload.client_id == client_id)
    count = session.scalar(select(func.count()).select_from(rows.limit(bound).subquery()))
    return Depth(int(count or 0), bound)


def admit_upload(session: Session, settings: Settings, client_id: int) -> None:
    """Refuse a new upload of ``client_id`` when the queue is at a bound.

    The global bound (``settings.queue_max_depth``) is checked first, then the client's own
    (``settings.queue_max_depth_per_client``). Each refusal is counted in
    ``moderation_uploads_refused_total{reason}``.

    Raises:
        QueueFullError: 503 ``queue_full`` past the global bound, 429 ``client_queue_full``
            past the client's; both with ``retry_after`` = ``settings.queue_retry_after`` (s).
    """
    if in_flight(session, settings.queue_max_depth).full:
        UPLOADS_REFUSED.labels(reason="queue_full").inc()
        raise QueueFullError(
            503,
            "queue_full",
            f"{settings.queue_max_depth} uploads are waiting to be screened; retry later",
            settings.queue_retry_after,
        )
    if in_flight(session, settings.queue_max_depth_per_client, client_id).full:
        UPLOADS_REFUSED.labels(reason="client_queue_full").inc()
        raise QueueFullError(
            429,
            "client_queue_full",
            f"{settings.queue_max_depth_per_client} uploads of this client are waiting to be "
            "screened; slow down",
            settings.queue_retry_after,
        )
