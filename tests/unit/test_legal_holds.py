"""Issue 14, item 6: legal holds as records: manual holds with reasons (audited), only manual
holds released by hand, expired holds released by the beat task, receipts naming each held
upload."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from moderation.governance.gdpr import erase_subject
from moderation.governance.legal_holds import (
    HoldError,
    list_holds,
    place_manual_hold,
    release_hold,
)
from moderation.matching.recording import record_result
from moderation.service.runtime import Runtime
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, LegalHold, Upload
from tests.unit.test_gdpr_library import _result as block_result


def _upload(rt: Runtime, subject: str | None = None) -> str:
    from moderation.service.subjects import pseudonymize

    with transaction(rt.sessions) as session:
        ref = pseudonymize(session, rt.keyring, subject) if subject else None
        return create_upload(
            session,
            b"photo",
            keyring=rt.keyring,
            blobs_dir=rt.settings.blobs_dir,
            subject_ref=ref,
        ).id


def _block(rt: Runtime, upload_id: str, days: int) -> None:
    with transaction(rt.sessions) as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        record_result(session, upload, block_result("block", days), actor="worker")


def _until(rt: Runtime, upload_id: str) -> datetime | None:
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        until = upload.legal_hold_until
    return None if until is None else until if until.tzinfo else until.replace(tzinfo=UTC)


def _events(rt: Runtime, action: str) -> list[AuditEvent]:
    with rt.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_manual_hold_is_placed_and_released_with_audited_reasons(runtime: Runtime) -> None:
    upload_id = _upload(runtime)
    with transaction(runtime.sessions) as session:
        hold_id = place_manual_hold(
            session, upload_id, days=30, reason="subpoena 2026-17", actor="user:3", origin="1.2.3.4"
        ).id
    until = _until(runtime, upload_id)
    assert until is not None
    assert timedelta(days=29) < until - datetime.now(UTC) <= timedelta(days=30)
    (placed,) = _events(runtime, "hold.place")
    assert placed.actor == "user:3" and placed.target == f"upload:{upload_id}"
    assert placed.details["reason"] == "subpoena 2026-17" and placed.details["source"] == "manual"
    with pytest.raises(ValueError, match="reason"), transaction(runtime.sessions) as session:
        release_hold(session, hold_id, reason=" ", actor="user:4")
    with pytest.raises(HoldError, match="no upload"), transaction(runtime.sessions) as session:
        place_manual_hold(session, "nope", days=1, reason="x", actor="user:3")
    with transaction(runtime.sessions) as session:
        release_hold(session, hold_id, reason="case closed", actor="user:4")
    assert _until(runtime, upload_id) is None
    (released,) = _events(runtime, "hold.release")
    assert released.actor == "user:4" and released.details["reason"] == "case closed"
    with pytest.raises(HoldError, match="already released"), transaction(runtime.sessions) as s:
        release_hold(s, hold_id, reason="again", actor="user:4")
    with runtime.sessions() as session:
        assert list_holds(session) == []
        (row,) = list_holds(session, include_released=True)
    assert row["released_by"] == "user:4" and row["release_reason"] == "case closed"


def test_holds_of_blocks_end_only_on_expiry(runtime: Runtime) -> None:
    upload_id = _upload(runtime)
    _block(runtime, upload_id, days=365)
    with runtime.sessions() as session:
        (automatic,) = session.scalars(select(LegalHold)).all()
        assert automatic.source == "automatic" and automatic.upload_id == upload_id
    block_until = _until(runtime, upload_id)
    with pytest.raises(HoldError, match="ends on expiry"), transaction(runtime.sessions) as s:
        release_hold(s, automatic.id, reason="want it gone", actor="user:3")
    # A shorter manual hold changes nothing; releasing it leaves the block's hold in force.
    with transaction(runtime.sessions) as session:
        manual = place_manual_hold(session, upload_id, days=10, reason="x", actor="user:3").id
    assert _until(runtime, upload_id) == block_until
    with transaction(runtime.sessions) as session:
        release_hold(session, manual, reason="done", actor="user:3")
    assert _until(runtime, upload_id) == block_until


def _beat_task(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> Any:
    import workers.tasks as tasks

    monkeypatch.setattr(tasks, "_runtime", rt)
    return tasks.release_holds


def test_release_holds_is_a_beat_task(settings: Any) -> None:
    import workers.tasks as tasks
    from workers.celery_app import HOLDS_TASK, celery_config

    schedule = celery_config(settings)["beat_schedule"]
    (entry,) = [e for e in schedule.values() if e["task"] == HOLDS_TASK]
    assert entry["options"]["queue"] == "maintenance" and entry["schedule"] <= 24 * 3600
    assert HOLDS_TASK in tasks.app.tasks and tasks.release_holds.name == HOLDS_TASK


def test_the_scheduler_releases_expired_holds_and_erases_what_they_kept(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _upload(runtime, "subject-h")
    other = _upload(runtime)
    with transaction(runtime.sessions) as session:
        place_manual_hold(session, kept, days=30, reason="litigation 12", actor="user:2")
        place_manual_hold(session, other, days=30, reason="appeal 9", actor="user:2")
    receipt = erase_subject(runtime, "subject-h", actor="user:5")
    assert receipt["held"]["uploads"] == 1
    release_holds = _beat_task(runtime, monkeypatch)
    assert release_holds()["holds_expired"] == 0  # nothing has ended yet
    with runtime.sessions() as session:
        assert session.get(Upload, kept) is not None
    past = datetime.now(UTC) - timedelta(minutes=1)
    with transaction(runtime.sessions) as session:
        session.execute(update(LegalHold).values(until=past))
    counts = release_holds()
    assert counts["holds_expired"] == 2 and counts["uploads"] == 1
    with runtime.sessions() as session:
        assert session.get(Upload, kept) is None  # the erased subject's upload goes for good
        remaining = session.get(Upload, other)
        assert remaining is not None and remaining.legal_hold_until is None
        assert session.scalars(select(LegalHold.released_by)).all() == ["scheduler"]
    (expired,) = _events(runtime, "hold.expire")
    assert expired.actor == "scheduler" and expired.details["uploads"] == 2


def test_erasure_receipt_names_each_held_item(runtime: Runtime) -> None:
    blocked, manual, free = (_upload(runtime, "subject-r") for _ in range(3))
    _block(runtime, blocked, days=365)
    with transaction(runtime.sessions) as session:
        place_manual_hold(session, manual, days=30, reason="police request 55", actor="user:2")
    receipt = erase_subject(runtime, "subject-r", actor="user:5")
    held = receipt["held"]
    assert held["uploads"] == 2 and receipt["counts"]["uploads"] == 1
    items = {item["upload_id"]: item for item in held["items"]}
    assert set(items) == {blocked, manual} and free not in items
    assert items[blocked]["category"] == "csam"
    assert [h["source"] for h in items[blocked]["holds"]] == ["automatic"]
    assert items[blocked]["citation"] in {e["citation"] for e in held["exceptions"]}
    (why,) = items[manual]["holds"]
    assert why["source"] == "manual" and why["reason"] == "police request 55"
    assert why["placed_by"] == "user:2" and items[manual]["until"] == why["until"]
