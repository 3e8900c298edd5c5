"""Hash-list import from the bank page: an import job that runs
:func:`moderation.banks.hash_import.import_hash_list`; malformed lines refuse the whole file and
the job page lists them; only admins may import."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from moderation.banks.hash_jobs import HASH_IMPORT_KIND
from moderation.banks.hashlists import te
from moderation.banks.job_staging import imports_dir
from moderation.banks.records import create_bank
from moderation.banks.versions import current_snapshot
from moderation.service.runtime import Runtime
from moderation.storage.console import Job
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Bank, Entry

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
    assert not list(imports_dir(console_runtime.settings).glob("*"))  # the staged copy is gone

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


# VideoMD5Signal.get_examples(); SHA-1 and SHA-256 of b"" (any exact hashes would do).
MD5_A = "cab08b36195edb1a1231d2d09fa450e0"
SHA1_A = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
SHA256_A = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
LISTED = (PDQ_A, PDQ_B, MD5_A, SHA1_A, SHA256_A)
TE_TYPES = ("pdq", "pdq", "video_md5", "sha1", "video_sha256")


def plaintext_in(data_dir: Path) -> list[str]:
    """Files under ``data_dir`` holding one of :data:`LISTED`: as hex (either case) or as raw
    digest bytes."""
    needles = [n for h in LISTED for n in (h.encode(), h.upper().encode(), bytes.fromhex(h))]
    return [
        f"{path.relative_to(data_dir)}: {needle!r}"
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
        for needle in needles
        if needle in path.read_bytes()
    ]


def scanning_check_value(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, found: list[list[str]]
) -> None:
    """Scan ``data_dir`` each time the ThreatExchange reader validates a value, i.e. while the
    job parses the list, recording what the scan found."""
    check = te.check_value

    def scan_then_check(signal_type: str, value: str) -> str:
        found.append(plaintext_in(data_dir))
        return check(signal_type, value)

    monkeypatch.setattr(te, "check_value", scan_then_check)


@pytest.mark.parametrize("malformed", [False, True])
def test_the_data_dir_never_holds_the_list_in_plaintext(
    client: Any,
    make_user: Callable[..., Any],
    console_runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    malformed: bool,
) -> None:
    client.login(make_user("admin"))
    bid = new_bank(console_runtime, "private")
    data_dir = console_runtime.settings.resolved_data_dir
    found: list[list[str]] = []
    scanning_check_value(monkeypatch, data_dir, found)
    lines = [f"{t} {v}\n" for t, v in zip(TE_TYPES, LISTED, strict=True)]
    if malformed:  # the job fails mid-way, after reading the first values
        lines.insert(3, f"pdq {PDQ_B[:-1]}\n")
    text = "".join(lines)
    response = post_list(
        client, bid, text, "list.txt", "threatexchange", client.token(f"/banks/{bid}")
    )
    job_page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert f'data-state="{"failed" if malformed else "done"}"' in job_page
    assert len(found) == len(LISTED) + malformed  # scanned while each value was read
    assert found == [[]] * len(found)
    assert plaintext_in(data_dir) == []
    with console_runtime.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Entry)) == (
            0 if malformed else len(LISTED)
        )
