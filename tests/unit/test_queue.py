"""The queue's library side, without a broker: submit, process, poison, reconcile, Q5-Q7."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.banks.versions import current_snapshot
from moderation.service.api_clients import create_api_client
from moderation.service.dispatch import RecordingDispatcher, attach_dispatcher
from moderation.service.queue import Outcome, SnapshotUnavailable, process_upload, reconcile
from moderation.service.runtime import Runtime
from moderation.service.submission import SubmissionError, submit_upload
from moderation.service.worker import WorkerState
from moderation.service.worker_health import check_reliability, worker_reports
from moderation.storage.db import transaction
from moderation.storage.models import (
    AuditEvent,
    CallbackDelivery,
    Screening,
    Subject,
    Upload,
)
from tests.conftest import skimage_photo


def jpeg(name: str, size: int = 160, quality: int = 90) -> bytes:
    image = skimage_photo(name)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture
def rt(runtime: Runtime, tmp_path: Path) -> Iterator[Runtime]:
    """A runtime with a one-entry bank (astronaut) and a recording dispatcher."""
    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    (bank_dir / "astronaut.jpg").write_bytes(jpeg("astronaut", 256))
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    import_bank(runtime, "known-bad", [bank_dir], actor="test")
    yield runtime


@pytest.fixture
def dispatcher(rt: Runtime) -> RecordingDispatcher:
    recording = RecordingDispatcher()
    attach_dispatcher(rt.sessions, recording)
    return recording


@pytest.fixture
def client_id(rt: Runtime) -> int:
    with transaction(rt.sessions) as session:
        created = create_api_client(
            session,
            rt.keyring,
            "acme",
            callback_allowlist=["https://hooks.example.com/moderation"],
        )
    return created.client_id


def submit(rt: Runtime, dispatcher: RecordingDispatcher, client_id: int, **kw: Any) -> str:
    args: dict[str, Any] = {
        "data": jpeg("astronaut"),
        "external_id": "post-1",
        "subject_id": "user-42",
    }
    args.update(kw)
    return submit_upload(rt, dispatcher, client_id=client_id, **args).upload_id


def count(rt: Runtime, query: Any) -> int:
    with rt.sessions() as session:
        return int(session.scalar(query) or 0)


def events(rt: Runtime, action: str) -> int:
    return count(
        rt, select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
    )


def test_submit_commits_before_sending_and_pseudonymises(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    seen_at_send: list[str | None] = []

    class Checking(RecordingDispatcher):
        def send_screening(self, upload_id: str) -> None:
            # A separate session sees the row: it was committed before the send.
            with rt.sessions() as session:
                seen_at_send.append(
                    session.scalar(select(Upload.status).where(Upload.id == upload_id))
                )
            super().send_screening(upload_id)

    checking = Checking()
    upload_id = submit(rt, checking, client_id, subject_id="raw-subject-id-77")
    assert checking.screenings == [upload_id]
    assert seen_at_send == ["queued"]
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        assert upload.subject_ref and "raw-subject-id-77" not in upload.subject_ref
        assert session.scalar(select(Subject.ref)) == upload.subject_ref
        blob = (rt.settings.blobs_dir / str(upload.blob_ref)).read_bytes()
        assert b"\xff\xd8\xff" not in blob[:16]  # stored encrypted
    assert events(rt, "upload.receive") == 1


def test_commit_failure_sends_nothing(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """Q7, first half: a commit that fails leaves no row and no task."""

    def fail(session: Session) -> None:
        raise RuntimeError("injected commit failure")

    event.listen(Session, "before_commit", fail)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            submit(rt, dispatcher, client_id)
    finally:
        event.remove(Session, "before_commit", fail)
    assert dispatcher.screenings == []
    assert count(rt, select(func.count()).select_from(Upload)) == 0


def test_send_failure_after_commit_is_reconciled(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """Q7, second half: the row committed without a task is re-sent by the reconciler."""
    dispatcher.fail = True
    result = submit_upload(
        rt,
        dispatcher,
        client_id=client_id,
        data=jpeg("coffee"),
        external_id="p",
        subject_id="s",
    )
    assert result.created and not result.sent
    dispatcher.fail = False
    assert reconcile(rt, dispatcher, stuck_after=3600).screenings == []  # not stuck yet
    report = reconcile(rt, dispatcher, stuck_after=0)
    assert report.screenings == [result.upload_id]
    assert dispatcher.screenings == [result.upload_id]
    # Re-sent rows are touched: the next run within the bound sends nothing again.
    assert reconcile(rt, dispatcher, stuck_after=60).screenings == []


def test_idempotency_key_gives_one_upload(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """Q6 at the library level (the HTTP test repeats it through the API)."""
    first = submit(rt, dispatcher, client_id, idempotency_key="k-1")
    again = submit_upload(
        rt,
        dispatcher,
        client_id=client_id,
        data=jpeg("astronaut"),
        external_id="post-1",
        subject_id="user-42",
        idempotency_key="k-1",
    )
    assert again.upload_id == first and not again.created
    assert count(rt, select(func.count()).select_from(Upload)) == 1
    assert dispatcher.screenings == [first]
    with pytest.raises(SubmissionError) as info:
        submit(rt, dispatcher, client_id, idempotency_key="k-1", data=jpeg("coffee"))
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"", 400), (b"%PDF-1.7 not an image", 415), (b"\xff\xd8\xff" + b"0" * 5000, 413)],
)
def test_submit_refuses_bad_bytes(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int, data: bytes, status: int
) -> None:
    from moderation.config import load_settings

    small = Runtime(load_settings(data_dir=rt.settings.data_dir, max_image_bytes=4096))
    with pytest.raises(SubmissionError) as info:
        submit(small, dispatcher, client_id, data=data)
    assert info.value.status == status
    assert dispatcher.screenings == []


def test_callback_url_must_match_allowlist(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    with pytest.raises(SubmissionError) as info:
        submit(rt, dispatcher, client_id, callback_url="https://evil.example/moderation")
    assert info.value.status == 422 and info.value.code == "callback_not_allowed"


def test_process_decides_once(rt: Runtime, dispatcher: RecordingDispatcher, client_id: int) -> None:
    upload_id = submit(
        rt, dispatcher, client_id, callback_url="https://hooks.example.com/moderation/in"
    )
    state = WorkerState(rt, poll_interval=60)
    done = process_upload(rt, upload_id, state.screener, max_attempts=3)
    assert done.outcome is Outcome.DECIDED and done.decision == "block"
    # Redelivery: no second result, audit event or callback.
    again = process_upload(rt, upload_id, state.screener, max_attempts=3)
    assert again.outcome is Outcome.ALREADY_DONE
    assert count(rt, select(func.count()).select_from(Screening)) == 1
    assert events(rt, "screening.decide") == 1
    assert count(rt, select(func.count()).select_from(CallbackDelivery)) == 1
    assert len(dispatcher.callbacks) == 1  # sent once, after the commit
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None and upload.status == "done" and upload.attempts == 1


def test_poison_after_max_attempts(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """Q3 at the library level: attempts that never finished end unscannable/poison."""
    upload_id = submit(rt, dispatcher, client_id)
    with transaction(rt.sessions) as session:
        session.execute(
            update(Upload).where(Upload.id == upload_id).values(attempts=3, status="processing")
        )
    state = WorkerState(rt, poll_interval=60)
    done = process_upload(rt, upload_id, state.screener, max_attempts=3)
    assert done.outcome is Outcome.POISON
    with rt.sessions() as session:
        screening = session.scalar(select(Screening).where(Screening.upload_id == upload_id))
        assert screening is not None
        assert (screening.decision, screening.reason) == ("unscannable", "poison")
        assert session.get(Upload, upload_id).attempts == 3  # type: ignore[union-attr]


def test_broken_snapshot_is_not_screened(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """A snapshot that fails verification: no screener, nothing counted, readiness says why."""
    upload_id = submit(rt, dispatcher, client_id)
    with rt.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        path = rt.settings.snapshots_dir / Path(row.path).name
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(bytes(data))
    state = WorkerState(rt, poll_interval=60)
    with pytest.raises(SnapshotUnavailable):
        process_upload(rt, upload_id, state.screener, max_attempts=3)
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None and upload.attempts == 0 and upload.status == "queued"
        _, reports = worker_reports(session, alive_within=60)
    assert len(reports) == 1 and reports[0].error


def test_worker_reloads_new_snapshot(rt: Runtime, tmp_path: Path) -> None:
    state = WorkerState(rt, poll_interval=0.0)
    first = state.screener().blocklist.version
    more = tmp_path / "more"
    more.mkdir()
    (more / "coffee.jpg").write_bytes(jpeg("coffee", 256))
    import_bank(rt, "known-bad", [more], actor="test")
    assert state.screener().blocklist.version == first + 1
    with rt.sessions() as session:
        current, reports = worker_reports(session, alive_within=60)
    assert current == first + 1
    assert reports[0].snapshot_version == current and reports[0].stale_s == 0.0


def test_reconciler_resends_overdue_callbacks(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    upload_id = submit(
        rt, dispatcher, client_id, callback_url="https://hooks.example.com/moderation"
    )
    state = WorkerState(rt, poll_interval=60)
    process_upload(rt, upload_id, state.screener, max_attempts=3)
    with transaction(rt.sessions) as session:
        session.execute(
            update(CallbackDelivery).values(
                next_attempt_at=datetime.now(UTC) - timedelta(minutes=5)
            )
        )
    report = reconcile(rt, dispatcher, stuck_after=60)
    assert len(report.callbacks) == 1


SAFE = {
    "visibility_timeout": 300,
    "task_time_limit": 120,
    "task_soft_time_limit": 108,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_serializer": "json",
    "accept_content": ["json"],
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"visibility_timeout": 120}, "visibility_timeout"),
        ({"visibility_timeout": 60}, "visibility_timeout"),
        ({"task_acks_late": False}, "acks_late"),
        ({"task_reject_on_worker_lost": False}, "celery #1628"),
        ({"worker_prefetch_multiplier": 4}, "prefetch"),
        ({"accept_content": ["json", "pickle"]}, "JSON"),
        ({"task_time_limit": None}, "task_time_limit"),
    ],
)
def test_check_reliability(change: dict[str, Any], needle: str) -> None:
    """Q5's rules as a pure function (the worker test runs them in a real worker)."""
    assert check_reliability(SAFE) == []
    problems = check_reliability({**SAFE, **change})
    assert problems and any(needle in p for p in problems)


# --- batching in workers (issue 7) -------------------------------------------------------------


class CountingScreener:
    """Wraps a worker's screener: records each ``screen_bytes`` batch size, and raises (a
    worker crash) while ``crash_on`` bytes are in the batch."""

    def __init__(self, state: WorkerState, crash_on: bytes | None = None) -> None:
        self.state = state
        self.crash_on = crash_on
        self.batches: list[int] = []

    def __call__(self) -> Any:
        real = self.state.screener()
        outer = self

        class Wrapped:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def screen_bytes(self, items: list[bytes], scopes: Any = None) -> Any:
                outer.batches.append(len(items))
                if outer.crash_on is not None and outer.crash_on in items:
                    raise SystemExit("worker killed mid-batch")
                return real.screen_bytes(items, scopes)

        return Wrapped()


def _attempts(rt: Runtime, upload_id: str) -> tuple[str, int]:
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        return upload.status, upload.attempts


def _submit_many(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int, names: list[str]
) -> list[str]:
    return [
        submit(rt, dispatcher, client_id, data=jpeg(name), external_id=f"p{i}")
        for i, name in enumerate(names)
    ]


def test_worker_batch_screens_fresh_uploads_in_one_encoder_batch(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    ids = _submit_many(rt, dispatcher, client_id, ["astronaut", "coffee", "chelsea", "camera"])
    screener = CountingScreener(WorkerState(rt, poll_interval=60))
    done = process_upload(rt, ids[1], screener, max_attempts=3, batch_size=8)
    assert done.outcome is Outcome.DECIDED and done.decision == "allow"
    assert screener.batches == [4]
    assert [_attempts(rt, i) for i in ids] == [("done", 1)] * 4
    with rt.sessions() as session:
        decisions = {s.upload_id: s.decision for s in session.scalars(select(Screening)).all()}
    assert decisions[ids[0]] == "block" and decisions[ids[2]] == "allow"
    # Each drained upload's own task still runs (its message is acknowledged then): it finds
    # the result and records nothing more.
    for other in (ids[0], ids[2], ids[3]):
        again = process_upload(rt, other, screener, max_attempts=3, batch_size=8)
        assert again.outcome is Outcome.ALREADY_DONE
    assert screener.batches == [4]
    assert count(rt, select(func.count()).select_from(Screening)) == 4
    assert events(rt, "screening.decide") == 4


def test_worker_batch_is_bounded_and_waits_once(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _submit_many(rt, dispatcher, client_id, ["astronaut", "coffee", "chelsea"])
    late: list[str] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # an upload arrives during the bounded wait
        waits.append(seconds)
        late.extend(_submit_many(rt, dispatcher, client_id, ["camera", "rocket"]))

    import moderation.service.queue as queue_module

    monkeypatch.setattr(queue_module.time, "sleep", sleep)
    screener = CountingScreener(WorkerState(rt, poll_interval=60))
    process_upload(rt, ids[0], screener, max_attempts=3, batch_size=4, batch_wait=0.02)
    assert waits == [0.02]
    assert screener.batches == [4]  # 3 found at once, 1 more after the wait; the cap holds
    statuses = [_attempts(rt, i)[0] for i in ids + late]
    assert statuses.count("done") == 4 and statuses.count("queued") == 1


def test_idle_worker_does_not_wait(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    (only,) = _submit_many(rt, dispatcher, client_id, ["coffee"])
    import moderation.service.queue as queue_module

    def sleep(seconds: float) -> None:
        raise AssertionError("a lone upload must not wait for company")

    monkeypatch.setattr(queue_module.time, "sleep", sleep)
    screener = CountingScreener(WorkerState(rt, poll_interval=60))
    done = process_upload(rt, only, screener, max_attempts=3, batch_size=16, batch_wait=0.02)
    assert done.outcome is Outcome.DECIDED and screener.batches == [1]


def test_crash_mid_batch_counts_one_attempt_each_and_isolates_the_poison_upload(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    """Q1/Q3 with batching: a batch that dies leaves every member with its attempt counted and
    its own task message; each is then retried alone, so only the poison upload ends poison."""
    ids = _submit_many(rt, dispatcher, client_id, ["astronaut", "coffee", "chelsea"])
    poison = jpeg("coffee")
    state = WorkerState(rt, poll_interval=60)
    crashing = CountingScreener(state, crash_on=poison)
    with pytest.raises(SystemExit):
        process_upload(rt, ids[0], crashing, max_attempts=2, batch_size=8)
    assert crashing.batches == [3]
    assert [_attempts(rt, i) for i in ids] == [("processing", 1)] * 3
    # Redeliveries (the batch owner's message, and the drained uploads' own messages).
    outcomes = {}
    for upload_id in ids:
        try:
            outcomes[upload_id] = process_upload(
                rt, upload_id, crashing, max_attempts=2, batch_size=8
            ).outcome
        except SystemExit:
            outcomes[upload_id] = "crashed"
    assert crashing.batches == [3, 1, 1, 1]  # every retry alone
    assert outcomes == {ids[0]: Outcome.DECIDED, ids[1]: "crashed", ids[2]: Outcome.DECIDED}
    final = process_upload(rt, ids[1], crashing, max_attempts=2, batch_size=8)
    assert final.outcome is Outcome.POISON
    with rt.sessions() as session:
        reasons = {s.upload_id: s.reason for s in session.scalars(select(Screening)).all()}
    assert reasons[ids[1]] == "poison"
    assert reasons[ids[0]] is None and reasons[ids[2]] is None
    assert [_attempts(rt, i)[1] for i in ids] == [2, 2, 2]


def test_uploads_attempted_before_are_never_drained(
    rt: Runtime, dispatcher: RecordingDispatcher, client_id: int
) -> None:
    ids = _submit_many(rt, dispatcher, client_id, ["astronaut", "coffee", "chelsea"])
    with transaction(rt.sessions) as session:  # re-sent by the reconciler after a crash
        session.execute(update(Upload).where(Upload.id == ids[2]).values(attempts=1))
    screener = CountingScreener(WorkerState(rt, poll_interval=60))
    process_upload(rt, ids[0], screener, max_attempts=3, batch_size=8)
    assert screener.batches == [2]
    assert _attempts(rt, ids[2]) == ("queued", 1)
