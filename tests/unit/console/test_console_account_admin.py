"""Issue 14, item 9: the console operations the CLI mirrors: an admin changes a user's role,
resets their password or TOTP (their sessions end, each audited), and renames a bank."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from moderation.banks.records import create_bank
from moderation.governance.users import authenticate
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Bank, User


def _actions(rt: Runtime) -> list[tuple[str, str | None]]:
    with rt.sessions() as db:
        return [(e.action, e.target) for e in db.scalars(select(AuditEvent))]


def test_admin_changes_role_and_resets_password_and_totp(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    rt = console_runtime
    admin, reviewer = make_user("admin"), make_user("reviewer")
    victim = new_client()
    victim.login(reviewer)
    client.login(admin)
    assert client.form(f"/users/{admin.id}/role", {"role": "auditor"}, token_from="/users")
    with rt.sessions() as db:
        assert db.get(User, admin.id).role == "admin"  # type: ignore[union-attr]
    refused = client.form(f"/users/{reviewer.id}/role", {"role": "dpo"}, token_from="/users")
    assert refused.status_code == 302  # a dpo needs TOTP, which the reviewer lacks
    with rt.sessions() as db:
        assert db.get(User, reviewer.id).role == "reviewer"  # type: ignore[union-attr]

    totp = client.form(f"/users/{reviewer.id}/totp", {"confirm": "reset"}, token_from="/users")
    assert totp.status_code == 200
    assert re.search(r"otpauth://totp/[^<]+", totp.get_data(as_text=True))
    assert victim.get("/review").status_code == 302  # the reset ended their session
    changed = client.form(f"/users/{reviewer.id}/role", {"role": "auditor"}, token_from="/users")
    assert changed.status_code == 302
    password = client.form(
        f"/users/{reviewer.id}/password", {"password": "a new long password"}, token_from="/users"
    )
    assert password.status_code == 302
    with transaction(rt.sessions) as db:
        user = authenticate(db, reviewer.email, "a new long password")
        assert user is not None and user.role == "auditor"
    target = f"user:{reviewer.id}"
    assert {
        ("user.totp_reset", target),
        ("user.role", target),
        ("user.password_reset", target),
    } <= set(_actions(rt))


def test_admin_renames_a_bank(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    rt = console_runtime
    with transaction(rt.sessions) as db:
        bid = create_bank(db, "old-name").id
        create_bank(db, "taken")
    client.login(make_user("admin"))
    taken = client.form(f"/banks/{bid}/rename", {"new_name": "taken"}, token_from=f"/banks/{bid}")
    assert taken.status_code == 302
    done = client.form(f"/banks/{bid}/rename", {"new_name": "new-name"}, token_from=f"/banks/{bid}")
    assert done.status_code == 302
    with rt.sessions() as db:
        assert db.get(Bank, bid).name == "new-name"  # type: ignore[union-attr]
    assert ("bank.rename", f"bank:{bid}") in _actions(rt)
