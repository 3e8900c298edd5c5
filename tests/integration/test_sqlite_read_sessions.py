"""SQLite: reads never wait for the write lock; writes still serialise on it.

Plain sessions begin DEFERRED (a WAL read snapshot, no lock); :func:`transaction` begins
IMMEDIATE (moderation.storage.db). Each test holds the database write lock in another
connection and checks what completes while it is held: no timing bound, the holder waits for
the reader (up to 60 s) and the test asserts the read finished while the lock was still held.
"""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import text

from admin import create_app
from moderation.config import load_settings
from moderation.service.api_clients import authenticate, create_api_client
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import Upload
from tests.conftest import skimage_photo

WAIT_S = 60.0


def _database_path(rt: Runtime) -> str:
    url = rt.settings.sqlalchemy_url
    assert url.startswith("sqlite:///"), url
    return url.removeprefix("sqlite:///")


@contextmanager
def write_lock_held(rt: Runtime) -> Iterator[sqlite3.Connection]:
    """Another connection holding ``BEGIN IMMEDIATE`` with a pending write, rolled back on exit."""
    other = sqlite3.connect(_database_path(rt), isolation_level=None, timeout=WAIT_S)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE api_clients SET name = name")
        yield other
    finally:
        other.execute("ROLLBACK")
        other.close()


def completes_under_lock(rt: Runtime, read: Callable[[], Any]) -> Any:
    """Run ``read`` in a thread while the write lock is held; its result. Fails if it raised
    or had not finished while the lock was held (the lock is held up to :data:`WAIT_S`)."""
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = read()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    with write_lock_held(rt):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        finished_under_lock = done.wait(WAIT_S)
    thread.join(WAIT_S)
    assert finished_under_lock, "the read waited for the write lock"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _token(rt: Runtime) -> str:
    with transaction(rt.sessions) as session:
        return create_api_client(session, rt.keyring, "acme").token


def test_a_read_session_does_not_wait_for_a_writer(runtime: Runtime) -> None:
    token = _token(runtime)

    def check_token() -> int | None:
        with runtime.sessions() as session:
            client = authenticate(session, token)
            return None if client is None else client.id

    assert completes_under_lock(runtime, check_token) is not None


def test_a_transaction_waits_for_the_writer_then_commits(runtime: Runtime) -> None:
    """Writes still queue on the lock (BEGIN IMMEDIATE waits for the busy timeout) rather than
    failing: the write below runs only once the holder rolled back, then commits."""
    token = _token(runtime)
    started, wrote = threading.Event(), threading.Event()

    def write() -> None:
        started.set()
        with transaction(runtime.sessions) as session:
            session.execute(text("UPDATE api_clients SET name = 'renamed'"))
        wrote.set()

    with write_lock_held(runtime):
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        assert started.wait(WAIT_S)
        # The holder still has the lock: the writer cannot have committed yet.
        assert not wrote.wait(1.0)
    thread.join(WAIT_S)
    assert wrote.is_set()
    with runtime.sessions() as session:
        client = authenticate(session, token)
        assert client is not None and client.name == "renamed"


def test_api_reads_answer_while_a_writer_holds_the_lock(runtime: Runtime) -> None:
    """The API's token check and an upload's GET use read sessions: they answer while another
    connection holds the write lock (before, both queued behind it for up to 30 s)."""
    settings = load_settings(data_dir=runtime.settings.data_dir)
    app = create_app(
        {"SETTINGS": settings, "TESTING": True, "MODERATION_DISPATCHER": RecordingDispatcher()}
    )
    client: FlaskClient = app.test_client()
    headers = {"Authorization": f"Bearer {_token(runtime)}"}
    image = io.BytesIO()
    skimage_photo("coffee").resize((96, 64)).save(image, "JPEG")
    created = client.post(
        "/api/v1/screenings",
        data={
            "external_id": "post-1",
            "subject_id": "user-42",
            "image": (io.BytesIO(image.getvalue()), "a.jpg"),
        },
        headers=headers,
        content_type="multipart/form-data",
    )
    assert created.status_code == 202, created.get_data(as_text=True)
    upload_id = created.get_json()["id"]
    # The first use recorded last_used_at (a write); the next uses within the hour only read.
    got = completes_under_lock(
        runtime, lambda: client.get(f"/api/v1/screenings/{upload_id}", headers=headers)
    )
    assert got.status_code == 202 and got.get_json()["status"] == "queued"
    with runtime.sessions() as session:
        assert session.get(Upload, upload_id) is not None
