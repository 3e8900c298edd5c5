"""Per-app collaborators of the API: Celery app and dispatcher, per-client rate limiters (one
window for uploads and other writes, one for reads), the per-client cap on concurrent ``?wait=``
requests and the subscriber that wakes them.

Built once per Flask app when the blueprint is registered. Tests may put a ready dispatcher in
the app config as ``MODERATION_DISPATCHER`` (e.g.
``moderation.service.dispatch.RecordingDispatcher``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from moderation.service.dispatch import Dispatcher, attach_dispatcher
from moderation.service.runtime import Runtime
from moderation.service.waits import DoneNotifier, WaitSlots

logger = logging.getLogger(__name__)

EXTENSION = "moderation.api"


class ClientLimiter:
    """Moving-window limit per API client, in Redis when configured (shared by every web
    process), else in memory. If Redis fails, the in-memory window takes over (per process)
    rather than refusing every upload."""

    def __init__(self, rate: str, redis_url: str | None, *, scope: str = "client") -> None:
        self.item: RateLimitItem = parse(rate)
        # The window's key namespace: two limiters of one rate must not share a window.
        self.scope = scope
        self.fallback = MovingWindowRateLimiter(storage_from_string("memory://"))
        self.primary = self.fallback
        if redis_url:
            storage = storage_from_string(
                redis_url,
                key_prefix="moderation:ratelimit",
                socket_connect_timeout=0.5,
                socket_timeout=0.5,
            )
            self.primary = MovingWindowRateLimiter(storage)

    def hit(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until the window frees a slot)."""
        for limiter in (self.primary, self.fallback):
            try:
                if limiter.hit(self.item, self.scope, key):
                    return True, 0.0
                stats = limiter.get_window_stats(self.item, self.scope, key)
                return False, max(1.0, stats.reset_time - time.time())
            except Exception as exc:  # Redis down: fall back to this process's window
                if limiter is self.fallback:
                    raise
                logger.warning("rate-limit storage failed (%s); using memory", exc)
        raise AssertionError("unreachable")


@dataclass
class ApiServices:
    """What the API views need besides the runtime."""

    dispatcher: Dispatcher
    celery: Any | None
    limiter: ClientLimiter  # uploads and other writes
    status_limiter: ClientLimiter  # reads
    wait_slots: WaitSlots
    notifier: DoneNotifier


def setup(app: Flask, runtime: Runtime) -> ApiServices:
    """Build (once) the app's services and attach the dispatcher to its sessions."""
    existing = app.extensions.get(EXTENSION)
    if isinstance(existing, ApiServices):
        return existing
    settings = runtime.settings
    celery = None
    dispatcher = app.config.get("MODERATION_DISPATCHER")
    if dispatcher is None:
        from moderation.service.model_events import add_change_listener
        from workers.celery_app import create_celery
        from workers.dispatch import CANARY_LISTENER, CeleryDispatcher, canary_requester

        celery = create_celery(settings)
        dispatcher = CeleryDispatcher(celery)
        if not app.testing:
            # Changes made from the console (a review that banks an upload) queue a canary run.
            add_change_listener(canary_requester(celery), key=CANARY_LISTENER)
    services = ApiServices(
        dispatcher=dispatcher,
        celery=celery,
        limiter=ClientLimiter(settings.api_rate_limit, settings.effective_redis_url),
        status_limiter=ClientLimiter(
            settings.api_status_rate_limit, settings.effective_redis_url, scope="client-read"
        ),
        wait_slots=WaitSlots(
            settings.api_max_concurrent_waits_per_client, settings.effective_redis_url
        ),
        notifier=DoneNotifier(settings.effective_redis_url),
    )
    # Decisions made in this process (reviews) send their callbacks after commit.
    attach_dispatcher(runtime.sessions, dispatcher)
    app.extensions[EXTENSION] = services
    return services


def services() -> ApiServices:
    """The current app's :class:`ApiServices`."""
    from admin import runtime

    return setup(current_app._get_current_object(), runtime())  # type: ignore[attr-defined]
