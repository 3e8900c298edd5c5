"""``?wait=`` plumbing (moderation.service.waits) against a real Redis and database: a commit that
makes an upload ``done`` wakes its waiters through pub/sub, and the per-client cap on concurrent
waits is shared, released, self-expiring, and kept in memory while Redis is down (RELIABILITY.md
S2; the HTTP side is tests/integration/test_web_abuse_serving.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from moderation.service import waits
from moderation.service.uploads import create_upload
from moderation.service.waits import (
    DoneNotifier,
    TooManyWaits,
    WaitSlots,
    publish_done_uploads,
    wait_for_upload,
)
from moderation.storage.db import transaction
from moderation.storage.models import Upload
from tests.conftest import Db
from tests.integration.queue_stack import RedisServer, free_port, wait_until

pytestmark = pytest.mark.redis

# Five greenlets each block 1 s in PostgreSQL (through SQLAlchemy's pool and psycopg 3) and then
# in Redis; cooperative drivers finish each round in about 1 s, blocking ones in 5 s or more.
GEVENT_PROBE = """
from gevent import monkey

monkey.patch_all()
import sys, time, gevent, redis
from sqlalchemy import create_engine, text

engine = create_engine(sys.argv[1], pool_size=5)

def pg():
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(1)"))

def rd():
    redis.Redis.from_url(sys.argv[2]).blpop("gevent-probe-nothing", timeout=1)

for name, job in (("psycopg", pg), ("redis", rd)):
    started = time.monotonic()
    gevent.joinall([gevent.spawn(job) for _ in range(5)], raise_error=True)
    print(name, time.monotonic() - started)
"""


def _queued_upload(db: Db, tmp_path: Path) -> str:
    with transaction(db.sessions) as session:
        upload = create_upload(
            session, None, keyring=db.keyring, blobs_dir=tmp_path, external_id="x"
        )
        return upload.id


def _set_status(db: Db, upload_id: str, status: str, *, commit: bool = True) -> None:
    session = db.sessions()
    try:
        row = session.get(Upload, upload_id)
        assert row is not None
        row.status = status
        session.flush()
        session.commit() if commit else session.rollback()
    finally:
        session.close()


def test_done_commit_wakes_waiters(db: Db, redis_server: RedisServer, tmp_path: Path) -> None:
    publish_done_uploads(db.sessions, redis_server.url)
    notifier = DoneNotifier(redis_server.url)
    upload_id = _queued_upload(db, tmp_path)
    runtime: Any = SimpleNamespace(sessions=db.sessions)
    with notifier.watch(upload_id) as woken:
        wait_until(notifier.subscribed.is_set, 20, "the subscription", interval=0.05)
        _set_status(db, upload_id, "processing")
        _set_status(db, upload_id, "done", commit=False)  # rolled back: nothing published
        assert not woken.wait(1.5)
        _set_status(db, upload_id, "done")
        assert woken.wait(10), "the commit's message never woke the waiter"

    # A whole wait returns "done" once another upload's commit is published.
    other = _queued_upload(db, tmp_path)
    result: list[Any] = []
    waiter = threading.Thread(
        target=lambda: result.append(wait_for_upload(runtime, other, 30, notifier))
    )
    waiter.start()
    wait_until(lambda: other in notifier._waiters, 10, "the waiter to register", interval=0.05)
    _set_status(db, other, "done")
    waiter.join(30)
    assert result == ["done"]
    assert wait_for_upload(runtime, "no-such-upload", 5, notifier) is None
    assert not notifier._waiters  # every waiter unregistered
    notifier.close()
    wait_until(lambda: not notifier.subscribed.is_set(), 20, "the subscriber to stop")


def test_slots_are_shared_released_and_expire(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = WaitSlots(2, redis_server.url), WaitSlots(2, redis_server.url)  # two processes
    with one.hold("7", 10), two.hold("7", 10):
        with pytest.raises(TooManyWaits) as refused, one.hold("7", 10):
            pass
        assert 1 <= refused.value.retry_after <= 10
        with two.hold("8", 10):  # another client is not affected
            pass
    with one.hold("7", 10), two.hold("7", 10):  # both slots were given back
        pass

    # A process killed mid-wait never releases; its slots expire on their own.
    monkeypatch.setattr(waits, "SLOT_GRACE", 0.5)
    assert one._acquire("9", "leaked-1", 0.5) and one._acquire("9", "leaked-2", 0.5)
    with pytest.raises(TooManyWaits):
        one._acquire("9", "third", 0.5)
    wait_until(lambda: _can_hold(two, "9"), 10, "the leaked slots to expire", interval=0.2)


def _can_hold(slots: WaitSlots, client: str) -> bool:
    try:
        with slots.hold(client, 1):
            return True
    except TooManyWaits:
        return False


def test_slots_count_in_memory_while_redis_is_down() -> None:
    slots = WaitSlots(1, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with slots.hold("7", 10), pytest.raises(TooManyWaits), slots.hold("7", 10):
        pass
    with slots.hold("7", 10):
        pass
    assert not slots._local


@pytest.mark.postgres
def test_database_and_redis_drivers_yield_under_gevent(
    postgres_server: str, redis_server: RedisServer
) -> None:
    """The premise of the gevent serving model (README "Serving model"): psycopg 3 and
    redis-py wait cooperatively once gevent has monkey-patched the process."""
    probe = subprocess.run(
        [sys.executable, "-c", GEVENT_PROBE, postgres_server, redis_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seconds = {name: float(value) for name, value in map(str.split, probe.stdout.splitlines())}
    assert set(seconds) == {"psycopg", "redis"}, probe.stdout
    assert all(value < 3.5 for value in seconds.values()), seconds  # serial: >= 5 s
