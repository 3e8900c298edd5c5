"""Quarantined (noisy) entries in the console: the dashboard's notice, the bank page's list and
its confirm/release buttons (admins only), audited."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from moderation.banks.records import create_bank
from moderation.banks.sealed_fields import new_entry
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Entry


def _quarantined_bank(rt: Runtime) -> tuple[int, list[int]]:
    """A block bank with three entries, the first two quarantined."""
    with transaction(rt.sessions) as db:
        bank = create_bank(db, "memes")
        db.flush()
        entries = [new_entry(db, rt.keyring, bank_id=bank.id, label=f"meme-{n}") for n in range(3)]
        for entry in entries[:2]:
            entry.quarantined_at = datetime.now(UTC)
            entry.quarantine_reason = "1200 matches on 2026-01-01 >= 1000 (bank memes median 0)"
        return bank.id, [e.id for e in entries]


def test_dashboard_notice_counts_entries_awaiting_an_admin(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("auditor"))
    assert 'id="quarantine-notice"' not in client.get("/dashboard").get_data(as_text=True)
    _quarantined_bank(console_runtime)
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'id="quarantine-notice"' in html
    assert "2 quarantined entries</strong> awaiting an admin" in html


def test_bank_page_lists_quarantined_entries_with_buttons_for_admins(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    bid, (first, second, third) = _quarantined_bank(console_runtime)
    page = f"/banks/{bid}"
    auditor = new_client()
    auditor.login(make_user("auditor"))
    seen = auditor.get(page).get_data(as_text=True)
    assert 'id="quarantined"' in seen and "1200 matches on 2026-01-01" in seen
    assert f"Confirm e_{first}" not in seen  # read-only role: no buttons

    admin = make_user("admin")
    client.login(admin)
    html = client.get(page).get_data(as_text=True)
    for eid in (first, second):
        assert f"Confirm e_{eid}" in html and f"Release e_{eid}" in html
    assert f"Confirm e_{third}" not in html

    confirmed = client.form(
        f"{page}/entries/{first}/quarantine", {"outcome": "confirm"}, token_from=page
    )
    assert confirmed.status_code == 302 and confirmed.headers["Location"] == page
    client.form(f"{page}/entries/{second}/quarantine", {"outcome": "release"}, token_from=page)
    after = client.get(page).get_data(as_text=True)
    assert 'id="quarantined"' not in after
    assert f"Entry e_{second} released." in after
    with console_runtime.sessions() as db:
        one, two = db.get(Entry, first), db.get(Entry, second)
        assert one is not None and one.quarantined_at is None and not one.disabled
        assert one.quarantine_confirmed_on is not None
        assert two is not None and two.quarantined_at is None and two.disabled
        events = db.scalars(
            select(AuditEvent).where(AuditEvent.action.like("entry.quarantine_%"))
        ).all()
    assert [(e.action, e.target, e.actor) for e in events] == [
        ("entry.quarantine_confirm", f"entry:e_{first}", f"user:{admin.id}"),
        ("entry.quarantine_release", f"entry:e_{second}", f"user:{admin.id}"),
    ]
    assert all(e.origin for e in events)

    # Not quarantined (any more): refused with a message; unknown outcome: 400; wrong bank: 404.
    client.form(f"{page}/entries/{third}/quarantine", {"outcome": "confirm"}, token_from=page)
    assert f"entry e_{third} is not quarantined" in client.get(page).get_data(as_text=True)
    bad = client.form(f"{page}/entries/{third}/quarantine", {"outcome": "x"}, token_from=page)
    assert bad.status_code == 400
    elsewhere = client.form(
        f"/banks/{bid + 1}/entries/{third}/quarantine", {"outcome": "confirm"}, token_from=page
    )
    assert elsewhere.status_code == 404


def test_cli_lists_confirms_and_releases(runner: Any, console_runtime: Runtime) -> None:
    import json

    _, (first, second, _third) = _quarantined_bank(console_runtime)
    listed = runner.invoke(["bank", "quarantined", "--json"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["entry_id"] for r in rows] == [f"e_{first}", f"e_{second}"]
    assert rows[0]["reason"].startswith("1200 matches") and rows[0]["matches_today"] == 0
    confirmed = json.loads(runner.invoke(["bank", "confirm-entry", f"e_{first}"]).output)
    assert (confirmed["outcome"], confirmed["disabled"]) == ("confirmed", False)
    released = json.loads(runner.invoke(["bank", "release-entry", f"e_{second}"]).output)
    assert (released["outcome"], released["disabled"]) == ("released", True)
    again = runner.invoke(["bank", "release-entry", f"e_{second}"])
    assert again.exit_code == 3 and f"entry e_{second} is not quarantined" in again.output
    assert runner.invoke(["bank", "quarantined", "--json"]).output == ""
    with console_runtime.sessions() as db:
        actors = set(
            db.scalars(select(AuditEvent.actor).where(AuditEvent.action.like("entry.quarantine_%")))
        )
    assert actors == {"cli"}
