"""Model-change notifications: a snapshot was published, a classifier model activated, the
policy (re)loaded or the encoder switched.

The library never imports Celery and the layers below the canary (:mod:`moderation.modelops`)
may not import it, so the changed code calls :meth:`moderation.service.runtime.Runtime.
notify_change` and each process registers what a change should trigger: the workers and the
console register a listener that enqueues a canary run (``workers/tasks.py``). A listener that
fails is logged and never fails the change (the beat's change check catches up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

REASONS = ("snapshot", "classifier", "policy", "encoder", "schedule", "manual")
"""What may have changed (``schedule``: beat's periodic run; ``manual``: an operator)."""

ChangeListener = Callable[[str], None]

_listeners: dict[str, ChangeListener] = {}


def add_change_listener(listener: ChangeListener, *, key: str | None = None) -> None:
    """Call ``listener(reason)`` on every change notified in this process. A listener added
    under the ``key`` of an earlier one replaces it (one Celery sender per process)."""
    _listeners[key or f"id:{id(listener)}"] = listener


def remove_change_listener(listener: ChangeListener) -> None:
    """Stop calling ``listener`` (tests)."""
    for key, value in list(_listeners.items()):
        if value == listener:
            del _listeners[key]


def notify_change(reason: str) -> None:
    """Call every listener with ``reason`` (one of :data:`REASONS`); failures are logged."""
    for listener in list(_listeners.values()):
        try:
            listener(reason)
        except Exception:
            logger.warning("model-change listener failed for %s", reason, exc_info=True)
