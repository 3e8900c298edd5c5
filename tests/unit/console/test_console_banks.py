"""Bank pages: create, zip import as a background job with progress (real encoder), entries,
enable/disable, and removals under the two-person rule."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.job_staging import JobError, imports_dir
from moderation.banks.jobs import InlineJobRunner, ThreadJobRunner, create_import_job, job_view
from moderation.banks.records import create_bank
from moderation.banks.sealed_fields import entry_labels
from moderation.banks.versions import current_snapshot
from moderation.governance.approvals import ApprovalError, approve, request_removal
from moderation.service.runtime import Runtime
from moderation.storage.console import Approval, Job
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Bank, Entry
from tests.conftest import skimage_photo_path

PHOTOS = ("astronaut", "chelsea", "coffee")


def photo_zip(extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in PHOTOS:
            path = skimage_photo_path(name)
            archive.writestr(f"photos/{name}{path.suffix}", path.read_bytes())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def bank_id(rt: Runtime, name: str) -> int:
    with rt.sessions() as db:
        found = db.scalar(select(Bank.id).where(Bank.name == name))
        assert found is not None
        return found


def test_create_bank_import_zip_and_see_entries(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    admin = make_user("admin")
    client.login(admin)
    created = client.form(
        "/banks", {"name": "known-bad", "kind": "block", "category": "default"}, token_from="/banks"
    )
    assert created.status_code == 302
    bid = bank_id(console_runtime, "known-bad")
    assert created.headers["Location"] == f"/banks/{bid}"
    duplicate = client.form(
        "/banks", {"name": "known-bad", "kind": "block", "category": "default"}, token_from="/banks"
    )
    assert duplicate.status_code == 400 and "already exists" in duplicate.get_data(as_text=True)

    archive = photo_zip({"<script>x</script>.jpg": b"not an image", "notes.txt": b"hello"})
    response = client.post(
        f"/banks/{bid}/import",
        data={
            "archive": (io.BytesIO(archive), "bank.zip"),
            "csrf_token": client.token(f"/banks/{bid}"),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 302
    job_url = response.headers["Location"]
    assert job_url.startswith("/banks/jobs/")
    # The inline runner has finished by now; the page shows the outcome.
    page = client.get(job_url).get_data(as_text=True)
    assert 'data-state="done"' in page
    assert "Added 3 entries; skipped 2." in page
    assert "&lt;script&gt;x&lt;/script&gt;.jpg" in page and "<script>x" not in page
    assert not list(imports_dir(console_runtime.settings).glob("*"))  # staged zip deleted

    entries = client.get(f"/banks/{bid}").get_data(as_text=True)
    for name in PHOTOS:
        assert f"photos/{name}" in entries
    assert 'id="entry-count">3<' in entries
    with console_runtime.sessions() as db:
        rows = db.scalars(select(Entry).where(Entry.bank_id == bid)).all()
        labels = entry_labels(db, console_runtime.keyring, [e.id for e in rows])
        assert sorted(labels.values()) == sorted(PHOTOS)
        assert all(e.added_by == f"user:{admin.id}" for e in rows)
        snapshot = current_snapshot(db)
        assert snapshot is not None and snapshot.entry_count == 3
        job = db.scalars(select(Job)).one()
        # notes.txt is skipped by name before reading, so 4 files are handled.
        assert (job.state, job.progress, job.total) == ("done", 4, 4)
        # The skipped file names are on the page (above) but sealed in the row.
        assert "script" not in json.dumps(job.result) and job.result["skipped_sealed"]
        actions = set(db.scalars(select(AuditEvent.action)))
    assert {"bank.create", "job.create", "bank.import"} <= actions

    # Importing the same zip again adds nothing (duplicates by SHA-256).
    again = client.post(
        f"/banks/{bid}/import",
        data={
            "archive": (io.BytesIO(archive), "bank.zip"),
            "csrf_token": client.token(f"/banks/{bid}"),
        },
        content_type="multipart/form-data",
    )
    assert "Added 0 entries" in client.get(again.headers["Location"]).get_data(as_text=True)


def test_not_a_zip_is_refused(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("admin"))
    client.form(
        "/banks", {"name": "b", "kind": "block", "category": "default"}, token_from="/banks"
    )
    bid = bank_id(console_runtime, "b")
    response = client.post(
        f"/banks/{bid}/import",
        data={
            "archive": (io.BytesIO(b"plain text"), "x.zip"),
            "csrf_token": client.token(f"/banks/{bid}"),
        },
        content_type="multipart/form-data",
    )
    assert response.headers["Location"] == f"/banks/{bid}"
    assert "not a zip archive" in client.get(f"/banks/{bid}").get_data(as_text=True)
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Job)) == 0


def _stage_photos(db: Session, rt: Runtime, bank: str, filename: str) -> str:
    """Queue an import of the photo zip into ``bank``; returns the job id."""
    return create_import_job(
        db,
        rt.settings,
        bank_name=bank,
        archive=io.BytesIO(photo_zip()),
        filename=filename,
        created_by="test",
        max_bytes=10**8,
    ).id


def test_thread_runner_reports_progress_and_failures(console_runtime: Runtime) -> None:
    rt = console_runtime
    with transaction(rt.sessions) as db:
        create_bank(db, "threaded")
        ok = _stage_photos(db, rt, "threaded", "ok.zip")
    # A job whose bank vanished before it ran fails with a message instead of hanging.
    with transaction(rt.sessions) as db:
        create_bank(db, "doomed")
        doomed = _stage_photos(db, rt, "doomed", "doomed.zip")
        db.delete(db.scalar(select(Bank).where(Bank.name == "doomed")))
    runner = ThreadJobRunner(rt)
    runner.submit(ok)
    runner.submit(doomed)
    runner.join(300)
    with rt.sessions() as db:
        done, failed = job_view(db, ok), job_view(db, doomed)
    assert done is not None and done.state == "done" and done.percent == 100
    assert done.result["added"] == 3
    assert failed is not None and failed.state == "failed"
    assert "doomed" in failed.result["error"]
    # Running a finished job again does nothing (idempotent for retried submissions).
    InlineJobRunner(rt).submit(ok)
    with rt.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Entry)) == 3


def test_archive_size_limit(console_runtime: Runtime) -> None:
    rt = console_runtime
    with pytest.raises(JobError, match="larger than"), transaction(rt.sessions) as db:
        create_bank(db, "small")
        create_import_job(
            db,
            rt.settings,
            bank_name="small",
            archive=io.BytesIO(photo_zip()),
            filename="big.zip",
            created_by="test",
            max_bytes=1000,
        )
    assert not list(imports_dir(rt.settings).glob("*"))


@pytest.fixture
def two_person_bank(console_runtime: Runtime) -> tuple[int, list[int]]:
    """Bank "two-person" with an entry per photo of PHOTOS: its id and the entry ids, in order."""
    from moderation.banks.operations import import_bank

    rt = console_runtime
    with transaction(rt.sessions) as db:
        create_bank(db, "two-person")
    import_bank(rt, "two-person", [skimage_photo_path(n) for n in PHOTOS], actor="test")
    with rt.sessions() as db:
        bid = bank_id(rt, "two-person")
        return bid, list(
            db.scalars(select(Entry.id).where(Entry.bank_id == bid).order_by(Entry.id))
        )


@pytest.fixture
def second_admin(
    client: Any, new_client: Callable[[], Any], make_user: Callable[..., Any]
) -> tuple[Any, Any]:
    """Two admins: the first signed in on ``client``; the second and a client of their own."""
    first, second = make_user("admin"), make_user("admin")
    client.login(first)
    other = new_client()
    other.login(second)
    return second, other


def _approve(client: Any, approval_id: int) -> Any:
    return client.form(
        f"/banks/approvals/{approval_id}", {"verdict": "approve"}, token_from="/banks/approvals"
    )


def test_removing_entries_needs_a_second_admin(
    client: Any,
    second_admin: tuple[Any, Any],
    console_runtime: Runtime,
    two_person_bank: tuple[int, list[int]],
) -> None:
    rt = console_runtime
    bid, entries = two_person_bank
    second, other = second_admin
    requested = client.form(
        f"/banks/{bid}/entries/remove", {"entry_ids": entries[:2]}, token_from=f"/banks/{bid}"
    )
    assert requested.headers["Location"] == "/banks/approvals"
    with rt.sessions() as db:
        approval = db.scalars(select(Approval)).one()
        assert approval.state == "pending" and approval.params["entry_ids"] == entries[:2]
        assert db.scalar(select(func.count()).select_from(Entry)) == 3  # nothing removed yet
    page = client.get("/banks/approvals").get_data(as_text=True)
    assert "waiting for another admin" in page
    # The requester cannot approve their own request.
    _approve(client, approval.id)
    with rt.sessions() as db:
        assert db.get(Approval, approval.id).state == "pending"  # type: ignore[union-attr]
        assert db.scalar(select(func.count()).select_from(Entry)) == 3

    done = _approve(other, approval.id)
    assert done.status_code == 302
    with rt.sessions() as db:
        row = db.get(Approval, approval.id)
        assert row is not None and (row.state, row.approved_by) == ("approved", second.id)
        assert list(db.scalars(select(Entry.id))) == entries[2:]
        snapshot = current_snapshot(db)
        assert snapshot is not None and snapshot.entry_count == 1
        actions = list(db.scalars(select(AuditEvent.action)))
    assert "approval.request" in actions and "approval.approve" in actions
    assert "entries.delete" in actions
    # Approving twice does nothing more.
    with pytest.raises(ApprovalError, match="already approved"):
        approve(rt, approval.id, approver_id=second.id)


def test_bank_deletion_needs_typed_name_and_second_admin(
    client: Any,
    second_admin: tuple[Any, Any],
    console_runtime: Runtime,
    two_person_bank: tuple[int, list[int]],
) -> None:
    rt = console_runtime
    bid, _entries = two_person_bank
    _second, other = second_admin
    client.form(f"/banks/{bid}/delete", {"confirm_name": "wrong"}, token_from=f"/banks/{bid}")
    with rt.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Approval)) == 0
    client.form(f"/banks/{bid}/delete", {"confirm_name": "two-person"}, token_from=f"/banks/{bid}")
    with rt.sessions() as db:
        approval_id = db.scalars(select(Approval.id)).one()
    _approve(other, approval_id)
    with rt.sessions() as db:
        assert db.get(Bank, bid) is None
        assert db.scalar(select(func.count()).select_from(Entry)) == 0


def test_request_removal_refusals(
    console_runtime: Runtime,
    make_user: Callable[..., Any],
    two_person_bank: tuple[int, list[int]],
) -> None:
    rt = console_runtime
    bid, entries = two_person_bank
    admin, reviewer = make_user("admin"), make_user("reviewer")
    with pytest.raises(ApprovalError, match="only an active admin"), transaction(rt.sessions) as db:
        request_removal(
            db, action="entries.delete", bank_id=bid, entry_ids=entries, requested_by=reviewer.id
        )
    with pytest.raises(ApprovalError, match="at least one"), transaction(rt.sessions) as db:
        request_removal(
            db, action="entries.delete", bank_id=bid, entry_ids=[], requested_by=admin.id
        )
    with pytest.raises(ApprovalError, match="not in this bank"), transaction(rt.sessions) as db:
        request_removal(
            db, action="entries.delete", bank_id=bid, entry_ids=[99999], requested_by=admin.id
        )


def test_disable_and_enable_bank_and_entry(
    client: Any,
    make_user: Callable[..., Any],
    console_runtime: Runtime,
    two_person_bank: tuple[int, list[int]],
) -> None:
    rt = console_runtime
    bid, entries = two_person_bank
    client.login(make_user("admin"))
    page = f"/banks/{bid}"
    client.form(f"{page}/entries/{entries[0]}/disabled", {"disabled": "1"}, token_from=page)
    client.form(f"{page}/enabled", {"enabled": "0"}, token_from=page)
    with rt.sessions() as db:
        assert db.get(Entry, entries[0]).disabled is True  # type: ignore[union-attr]
        assert db.get(Bank, bid).enabled is False  # type: ignore[union-attr]
        assert current_snapshot(db).entry_count == 0  # type: ignore[union-attr]
    client.form(f"{page}/enabled", {"enabled": "1"}, token_from=page)
    client.form(f"{page}/entries/{entries[0]}/disabled", {"disabled": "0"}, token_from=page)
    with rt.sessions() as db:
        assert current_snapshot(db).entry_count == 3  # type: ignore[union-attr]
    # An entry id from another bank is not found under this bank.
    assert (
        client.form(
            f"/banks/{bid + 1}/entries/{entries[0]}/disabled", {"disabled": "1"}, token_from=page
        ).status_code
        == 404
    )
