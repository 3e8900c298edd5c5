"""Hash-list import from the bank page: an import job that runs
:func:`moderation.banks.hash_import.import_hash_list`; malformed lines refuse the whole file and
the job page lists them; only admins may import."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from moderation.banks.hash_jobs import HASH_IMPORT_KIND
from moderation.banks.job_staging import imports_dir
from moderation.banks.records import create_bank
from moderation.banks.versions import current_snapshot
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Bank, Entry, Job

# PdqSignal.get_examples() (ThreatExchange pdq/data/bridge-mods).
PDQ_A = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
PDQ_B = "f8f8f0cee0f4a84f06370a2a038f63f0b36e26d596621e1d33e6b39c4e9c9b22"


def new_bank(rt: Runtime, name: str) -> int:
    with transaction(rt.sessions) as db:
        create_bank(db, name)
    with rt.sessions() as db:
        found = db.scalar(select(Bank.id).where(Bank.name == name))
        assert found is not None
        return found


def post_list(client: Any, bid: int, text: str, filename: str, fmt: str, token: str) -> Any:
    return client.post(
        f"/banks/{bid}/import-hashes",
        data={
            "hashes": (io.BytesIO(text.encode()), filename),
            "format": fmt,
            "csrf_token": token,
        },
        content_type="multipart/form-data",
    )


def test_admin_imports_a_pdq_list_and_the_bank_shows_it(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    admin = make_user("admin")
    client.login(admin)
    bid = new_bank(console_runtime, "pdq-list")
    page = client.get(f"/banks/{bid}").get_data(as_text=True)
    assert 'id="hash-import-form"' in page and '<option value="ncmec">' in page

    text = f"# two PDQ hashes\n{PDQ_A},100\n\n{PDQ_B},90,bridge.jpg\n"
    response = post_list(client, bid, text, "list.txt", "pdq", client.token(f"/banks/{bid}"))
    assert response.status_code == 302
    job_url = response.headers["Location"]
    assert job_url.startswith("/banks/jobs/")
    job_page = client.get(job_url).get_data(as_text=True)
    assert 'data-state="done"' in job_page
    assert "Added 2 entries; merged 0; skipped 0 lines." in job_page
    assert not list(imports_dir(console_runtime.settings).glob("*"))  # staged and plain copies

    bank_page = client.get(f"/banks/{bid}").get_data(as_text=True)
    assert 'id="entry-count">2<' in bank_page
    assert "list.txt:2" in bank_page and "list.txt:4" in bank_page and "bridge.jpg" in bank_page
    with console_runtime.sessions() as db:
        rows = db.scalars(select(Entry).where(Entry.bank_id == bid)).all()
        assert {e.origin for e in rows} == {"hash_list"}
        assert {e.added_by for e in rows} == {f"user:{admin.id}"}
        snapshot = current_snapshot(db)
        assert snapshot is not None and snapshot.entry_count == 2
        job = db.scalars(select(Job)).one()
        assert (job.kind, job.state, job.params["format"]) == (HASH_IMPORT_KIND, "done", "pdq")
        assert {"job.create", "bank.import_hashes"} <= set(db.scalars(select(AuditEvent.action)))


def test_a_malformed_line_is_shown_and_nothing_is_imported(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("admin"))
    bid = new_bank(console_runtime, "strict")
    text = f"{PDQ_A}\n{PDQ_B[:-1]}\n{PDQ_B}\n"
    response = post_list(client, bid, text, "bad.txt", "pdq", client.token(f"/banks/{bid}"))
    job_page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'data-state="failed"' in job_page
    assert "1 malformed line(s), nothing imported" in job_page
    assert "<tr><td>2</td>" in job_page
    assert "pdq value must be 64 hex characters, got 63" in job_page
    assert not list(imports_dir(console_runtime.settings).glob("*"))
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Entry)) == 0
        assert current_snapshot(db) is None
        assert "bank.import_hashes" not in set(db.scalars(select(AuditEvent.action)))
    assert 'id="entry-count">0<' in client.get(f"/banks/{bid}").get_data(as_text=True)


def test_a_reviewer_cannot_import(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("reviewer"))
    bid = new_bank(console_runtime, "guarded")
    response = post_list(client, bid, f"{PDQ_A}\n", "list.txt", "pdq", client.token("/review"))
    assert response.status_code == 403
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Job)) == 0
        assert db.scalar(select(func.count()).select_from(Entry)) == 0
