"""Long polls of the upload hook (``?wait=``): a cap on each client's concurrent waits, waits
woken by a Redis pub/sub message when an upload is done, and the worker side that publishes it
(RELIABILITY.md S2).

* :class:`WaitSlots` counts a client's waits in progress in a Redis sorted set (one member per
  wait, scored by the time its slot expires), so every web process shares the cap and a process
  killed mid-wait leaks nothing: its members expire on their own ``SLOT_GRACE`` seconds after
  their wait's deadline. Without Redis (or while it fails) each process counts its own waits.
* :class:`DoneNotifier` runs one subscriber per web process on :data:`DONE_CHANNEL`; a waiter
  registers its upload id, re-reads the row, and sleeps until woken or until the next safety
  poll (:data:`NOTIFIED_POLL` s; :data:`FALLBACK_POLL` s while no subscription is up).
* :func:`publish_done_uploads` makes a session factory publish, after commit, the id of every
  upload whose status became ``done`` in the transaction (the worker's sessions).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from moderation.service.runtime import Runtime
from moderation.storage.models import Upload

logger = logging.getLogger(__name__)

DONE_CHANNEL = "moderation:uploads:done"
"""Pub/sub channel: each message is the id of an upload that just became ``done``."""
SLOT_KEY = "moderation:waits:"
"""Prefix of the per-client sorted sets of waits in progress (suffix: the client id)."""
SLOT_GRACE = 30.0
"""Seconds a slot outlives its wait's deadline before it expires on its own (a killed process)."""
NOTIFIED_POLL = 1.0
"""Seconds between database re-reads of a waited upload while the subscription is up (a safety
net for a lost message)."""
FALLBACK_POLL = 0.2
"""Seconds between database re-reads while no subscription is up (no Redis, or it failed)."""
RESUBSCRIBE_DELAY = 1.0
"""Seconds the subscriber waits before reconnecting to a failed Redis."""
NOTIFIER_CHECK = 5.0
"""Seconds the subscriber blocks for a message before it checks whether it was closed."""
_PENDING_DONE = "moderation.waits.done"
_REDIS_TIMEOUT = 0.5  # s, connect and command timeout of the cap's and publisher's Redis calls

# KEYS[1]: the client's set; ARGV: now, cap, expiry of the new slot, its member, key TTL (s).
# Returns {1, expiry} when the slot is taken, else {0, expiry of the oldest slot}.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, first[2]}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, ARGV[3]}
"""


class TooManyWaits(Exception):
    """The client already holds its cap of concurrent waits; ``retry_after`` (s, >= 1) is when
    its oldest wait ends at the latest."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many concurrent waits; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(
        url, socket_connect_timeout=_REDIS_TIMEOUT, socket_timeout=_REDIS_TIMEOUT
    )


class WaitSlots:
    """At most ``cap`` concurrent waits per client, shared by every web process through Redis
    when ``redis_url`` is set, else (and while Redis fails) counted per process."""

    def __init__(self, cap: int, redis_url: str | None) -> None:
        self.cap = cap
        self._client = _redis(redis_url) if redis_url else None
        self._script = self._client.register_script(_ACQUIRE) if self._client else None
        self._local: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, client: str, seconds: float) -> Iterator[None]:
        """One of ``client``'s slots for a wait of ``seconds`` (s), released on exit.

        Raises:
            TooManyWaits: the client holds ``cap`` slots already.
        """
        member = uuid.uuid4().hex
        in_redis = self._acquire(client, member, seconds)
        try:
            yield
        finally:
            self._release(client, member, in_redis)

    def _acquire(self, client: str, member: str, seconds: float) -> bool:
        """Take a slot; True when it is in Redis, False when in this process."""
        now = time.time()
        expiry = now + seconds + SLOT_GRACE
        if self._script is not None:
            try:
                ttl = int(seconds + SLOT_GRACE) + 1
                taken, first = self._script(
                    keys=[SLOT_KEY + client], args=[now, self.cap, expiry, member, ttl]
                )
            except Exception as exc:  # Redis down: count in this process instead
                logger.warning("wait-slot storage failed (%s); counting in memory", exc)
            else:
                if not int(taken):
                    raise TooManyWaits(self._retry_after(float(first), now))
                return True
        with self._lock:
            slots = self._local.setdefault(client, {})
            for key in [k for k, end in slots.items() if end <= now]:
                del slots[key]
            if len(slots) >= self.cap:
                raise TooManyWaits(self._retry_after(min(slots.values()), now))
            slots[member] = expiry
        return False

    @staticmethod
    def _retry_after(first_expiry: float, now: float) -> float:
        return max(1.0, first_expiry - SLOT_GRACE - now)

    def _release(self, client: str, member: str, in_redis: bool) -> None:
        if in_redis and self._client is not None:
            try:
                self._client.zrem(SLOT_KEY + client, member)
            except Exception as exc:  # the member expires on its own
                logger.warning("could not release a wait slot (%s); it expires", exc)
            return
        with self._lock:
            slots = self._local.get(client, {})
            slots.pop(member, None)
            if not slots:
                self._local.pop(client, None)


class DoneNotifier:
    """This process's subscriber to :data:`DONE_CHANNEL` (a daemon thread, a greenlet under
    gevent, started by the first wait); wakes the waiters of each upload id it receives."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self.subscribed = threading.Event()
        self._closed = threading.Event()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, upload_id: str) -> Iterator[threading.Event]:
        """An event set when ``upload_id`` is published as done (while inside the block)."""
        self._start()
        woken = threading.Event()
        with self._lock:
            self._waiters.setdefault(upload_id, set()).add(woken)
        try:
            yield woken
        finally:
            with self._lock:
                waiters = self._waiters.get(upload_id, set())
                waiters.discard(woken)
                if not waiters:
                    self._waiters.pop(upload_id, None)

    def wake(self, upload_id: str) -> None:
        """Wake every waiter of ``upload_id`` in this process."""
        with self._lock:
            waiters = list(self._waiters.get(upload_id, ()))
        for woken in waiters:
            woken.set()

    def close(self) -> None:
        """Stop the subscriber within :data:`NOTIFIER_CHECK` s (waiters fall back to polling)."""
        self._closed.set()

    def _start(self) -> None:
        if self.redis_url is None or self._thread is not None or self._closed.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._listen, name="moderation-wait-notifier", daemon=True
                )
                self._thread.start()

    def _listen(self) -> None:
        import redis

        assert self.redis_url is not None
        while not self._closed.is_set():
            try:
                client = redis.Redis.from_url(
                    self.redis_url, socket_connect_timeout=1.0, health_check_interval=10
                )
                with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(DONE_CHANNEL)
                    self.subscribed.set()
                    while not self._closed.is_set():
                        message = pubsub.get_message(timeout=NOTIFIER_CHECK)
                        if message is not None and message.get("type") == "message":
                            self.wake(message["data"].decode("ascii", "replace"))
            except Exception as exc:  # Redis down or gone: poll the database until it is back
                if self.subscribed.is_set():
                    logger.warning("upload-done subscription lost (%s); polling", exc)
                self.subscribed.clear()
                self._closed.wait(RESUBSCRIBE_DELAY)
        self.subscribed.clear()


def wait_for_upload(
    runtime: Runtime, upload_id: str, timeout: float, notifier: DoneNotifier | None = None
) -> str | None:
    """Wait until the upload is ``done`` or ``timeout`` (s) passed; returns its last status
    (None when it does not exist). Woken by ``notifier`` when one is given and subscribed; the
    row is re-read every :data:`NOTIFIED_POLL` s anyway (every :data:`FALLBACK_POLL` s without
    a subscription)."""
    deadline = time.monotonic() + timeout
    watching = notifier.watch(upload_id) if notifier else contextlib.nullcontext(None)
    with watching as woken:
        while True:
            with runtime.sessions() as session:
                status = session.scalar(select(Upload.status).where(Upload.id == upload_id))
            left = deadline - time.monotonic()
            if status is None or status == "done" or left <= 0:
                return status
            if woken is None or notifier is None:
                time.sleep(min(FALLBACK_POLL, left))
                continue
            poll = NOTIFIED_POLL if notifier.subscribed.is_set() else FALLBACK_POLL
            woken.wait(min(poll, left))
            woken.clear()


def publish_done_uploads(sessions: sessionmaker[Session], redis_url: str) -> None:
    """After each commit of a session from ``sessions``, publish on :data:`DONE_CHANNEL` the id
    of every upload whose status became ``done`` in that transaction. Best effort: a failed
    publish is logged, and its waiters find the row at their next poll."""
    publisher = _redis(redis_url)

    def collect(session: Session, _context: Any) -> None:
        for obj in (*session.new, *session.dirty):
            if isinstance(obj, Upload) and "done" in inspect(obj).attrs.status.history.added:
                session.info.setdefault(_PENDING_DONE, set()).add(obj.id)

    def publish(session: Session) -> None:
        for upload_id in session.info.pop(_PENDING_DONE, ()):
            try:
                publisher.publish(DONE_CHANNEL, upload_id)
            except Exception as exc:
                logger.warning("could not publish upload %s done (%s)", upload_id, exc)

    def drop(session: Session) -> None:
        session.info.pop(_PENDING_DONE, None)

    event.listen(sessions, "after_flush", collect)
    event.listen(sessions, "after_commit", publish)
    event.listen(sessions, "after_rollback", drop)
