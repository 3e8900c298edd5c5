"""Sending work to workers, after the database commit (STYLE.md rule 15).

The library never imports Celery: it talks to a :class:`Dispatcher` handed in by the process
(``workers.dispatch.CeleryDispatcher`` in the web app and the workers, the in-memory
:class:`RecordingDispatcher` in tests). Code that must send work after *someone else's*
transaction commits (``moderation.service.callbacks.notify_decision``, called inside a review
decision)
finds the dispatcher in ``Session.info`` (put there for every session of a ``sessionmaker`` by
:func:`attach_dispatcher`) and queues the send with :func:`send_after_commit`. A send lost to a
crash between commit and send is re-sent by the reconciler (``moderation.service.queue.reconcile``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

DISPATCHER_INFO_KEY = "moderation.dispatcher"
_PENDING_INFO_KEY = "moderation.after_commit"


class Dispatcher(Protocol):
    """Sends tasks by id. Implementations may raise when the broker is unreachable."""

    def send_screening(self, upload_id: str) -> None:
        """Queue ``moderation.screen`` for an upload whose row is committed."""

    def send_callback(self, delivery_id: str, countdown: float = 0.0) -> None:
        """Queue ``moderation.deliver_callback`` for a committed delivery, after ``countdown`` s."""


@dataclass
class RecordingDispatcher:
    """In-memory dispatcher: records what would be sent (tests, the embedded mode's checks)."""

    screenings: list[str] = field(default_factory=list)
    callbacks: list[tuple[str, float]] = field(default_factory=list)
    fail: bool = False

    def send_screening(self, upload_id: str) -> None:
        """Record (or, with ``fail``, raise ConnectionError like an unreachable broker)."""
        if self.fail:
            raise ConnectionError("broker unreachable (RecordingDispatcher.fail)")
        self.screenings.append(upload_id)

    def send_callback(self, delivery_id: str, countdown: float = 0.0) -> None:
        """Record (or, with ``fail``, raise ConnectionError)."""
        if self.fail:
            raise ConnectionError("broker unreachable (RecordingDispatcher.fail)")
        self.callbacks.append((delivery_id, countdown))


def attach_dispatcher(sessions: sessionmaker[Session], dispatcher: Dispatcher) -> None:
    """Make ``dispatcher`` available to every session ``sessions`` creates."""
    sessions.configure(info={DISPATCHER_INFO_KEY: dispatcher})


def session_dispatcher(session: Session) -> Dispatcher | None:
    """The dispatcher attached to ``session``'s factory, if any."""
    value = session.info.get(DISPATCHER_INFO_KEY)
    return value if value is not None else None


def _run_pending(session: Session) -> None:
    pending: list[Callable[[], None]] = session.info.pop(_PENDING_INFO_KEY, [])
    for send in pending:
        try:
            send()
        except Exception:  # the row is committed; the reconciler re-sends what was lost
            logger.warning(
                "sending after commit failed; the reconciler will re-send", exc_info=True
            )


def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING_INFO_KEY, None)


def send_after_commit(session: Session, send: Callable[[], None]) -> None:
    """Call ``send`` once the current transaction of ``session`` commits (never on rollback).

    ``send`` errors are logged, not raised: the committed rows stay pending and the reconciler
    re-sends them.
    """
    pending = session.info.setdefault(_PENDING_INFO_KEY, [])
    pending.append(send)
    if not event.contains(session, "after_commit", _run_pending):
        event.listen(session, "after_commit", _run_pending)
        event.listen(session, "after_rollback", _drop_pending)
