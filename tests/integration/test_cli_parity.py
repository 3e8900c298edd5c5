"""Issue 14, item 9: every console operation on the command line, through the same library
functions, audited: bank rename/enable/disable/delete, entry removal with its second-admin
approval, user role change, password and TOTP reset, legal holds, classifier rollback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select

from moderation.config import load_settings
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, ClassifierModel, User
from tests.conftest import Cli, skimage_photo_path

PASSWORD = "a long enough password"


@contextmanager
def _runtime(cli: Cli) -> Iterator[Runtime]:
    rt = Runtime(load_settings(data_dir=cli.data_dir))
    try:
        yield rt
    finally:
        rt.engine.dispose()


def _stdin(cli: Cli, args: list[str], text: str) -> Result:
    from moderation.cli import main

    return cli.runner.invoke(main, args, input=text, catch_exceptions=False)


def _user(cli: Cli, email: str, role: str) -> None:
    result = _stdin(cli, ["users", "create", email, "--role", role, "--password-stdin"], PASSWORD)
    assert result.exit_code == 0, result.output


def _events(cli: Cli, action: str) -> list[AuditEvent]:
    with _runtime(cli) as rt, rt.sessions() as db:
        return list(db.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def _out(result: Result) -> dict[str, Any]:
    value = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(value, dict)
    return value


@pytest.mark.slow
def test_bank_operations_and_removals_with_a_second_admin(cli: Cli, tmp_path: Path) -> None:
    cli("init")
    _user(cli, "first@example.org", "admin")
    _user(cli, "second@example.org", "admin")
    cli("bank", "create", "known")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        shutil.copy(skimage_photo_path(name), folder / skimage_photo_path(name).name)
    cli("bank", "import", "known", str(folder))
    renamed = _out(cli("bank", "rename", "known", "known-bad"))
    assert renamed["previous_name"] == "known" and renamed["snapshot_version"] >= 2
    assert [b["name"] for b in cli.json_lines("bank", "list", "--json")] == ["known-bad"]
    assert _events(cli, "bank.rename")[0].details == {"from": "known", "to": "known-bad"}
    assert _out(cli("bank", "disable", "known-bad"))["enabled"] is False
    assert cli.json_lines("bank", "list", "--json")[0]["enabled"] is False
    cli("bank", "enable", "known-bad")
    assert [e.actor for e in _events(cli, "bank.disable") + _events(cli, "bank.enable")] == [
        "cli",
        "cli",
    ]

    entries = [e["entry_id"] for e in cli.json_lines("bank", "entries", "known-bad", "--json")]
    asked = _out(
        cli("bank", "remove-entries", "known-bad", entries[0], "--as", "first@example.org")
    )
    approval = str(asked["approval_id"])
    assert len(cli.json_lines("bank", "entries", "known-bad", "--json")) == 3  # not yet
    own = cli("approvals", "approve", approval, "--as", "first@example.org", ok=False)
    assert own.exit_code == 1 and "second admin" in own.stderr
    cli("approvals", "approve", approval, "--as", "second@example.org")
    left = [e["entry_id"] for e in cli.json_lines("bank", "entries", "known-bad", "--json")]
    assert left == entries[1:]
    with _runtime(cli) as rt, rt.sessions() as db:
        second = db.scalar(select(User.id).where(User.email == "second@example.org"))
    (removed,) = _events(cli, "entries.delete")
    assert removed.actor == f"user:{second}"

    deletion = _out(cli("bank", "delete", "known-bad", "--as", "second@example.org"))
    (pending,) = cli.json_lines("approvals", "list", "--json")
    assert pending["approval_id"] == deletion["approval_id"] and pending["action"] == "bank.delete"
    cli("approvals", "reject", str(deletion["approval_id"]), "--as", "first@example.org")
    assert cli.json_lines("approvals", "list", "--json") == []
    assert [b["name"] for b in cli.json_lines("bank", "list", "--json")] == ["known-bad"]
    nobody = cli("bank", "delete", "known-bad", "--as", "nobody@example.org", ok=False)
    assert nobody.exit_code == 2 and "no console user" in nobody.stderr


def test_user_role_password_and_totp_reset(cli: Cli) -> None:
    from moderation.governance.users import authenticate

    cli("init")
    _user(cli, "rev@example.org", "reviewer")
    refused = cli("users", "set-role", "rev@example.org", "admin", ok=False)
    assert refused.exit_code == 1 and "TOTP" in refused.stderr
    reset = _out(cli("users", "reset-totp", "rev@example.org"))
    assert reset["totp_uri"].startswith("otpauth://totp/")
    assert _out(cli("users", "set-role", "rev@example.org", "admin"))["role"] == "admin"
    new_password = "another long password"
    done = _stdin(
        cli, ["users", "reset-password", "rev@example.org", "--password-stdin"], new_password
    )
    assert done.exit_code == 0, done.output
    with _runtime(cli) as rt, transaction(rt.sessions) as db:
        assert authenticate(db, "rev@example.org", PASSWORD) is None
        user = authenticate(db, "rev@example.org", new_password)
        assert user is not None and user.role == "admin"
    (role,) = _events(cli, "user.role")
    assert role.actor == "cli" and role.details == {"from": "reviewer", "to": "admin"}
    assert [e.actor for e in _events(cli, "user.password_reset")] == ["cli"]
    assert [e.actor for e in _events(cli, "user.totp_reset")] == ["cli"]
    assert new_password not in json.dumps([e.details for e in _events(cli, "user.password_reset")])


def test_hold_place_list_release(cli: Cli) -> None:
    from moderation.service.uploads import create_upload

    cli("init")
    with _runtime(cli) as rt, transaction(rt.sessions) as db:
        upload_id = create_upload(
            db, b"photo", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir
        ).id
    placed = _out(cli("hold", "place", upload_id, "--days", "90", "--reason", "case 12"))
    assert placed["source"] == "manual" and placed["placed_by"] == "cli"
    (listed,) = cli.json_lines("hold", "list", "--json")
    assert listed["hold_id"] == placed["hold_id"] and listed["reason"] == "case 12"
    unknown = cli("hold", "place", "nope", "--days", "1", "--reason", "x", ok=False)
    assert unknown.exit_code == 1 and "no upload" in unknown.stderr
    hold_id = str(placed["hold_id"])
    cli("hold", "release", hold_id, "--reason", "case closed")
    assert cli.json_lines("hold", "list", "--json") == []
    assert cli.json_lines("hold", "list", "--all", "--json")[0]["release_reason"] == "case closed"
    again = cli("hold", "release", hold_id, "--reason", "again", ok=False)
    assert again.exit_code == 1 and "already released" in again.stderr
    assert [e.actor for e in _events(cli, "hold.place") + _events(cli, "hold.release")] == [
        "cli",
        "cli",
    ]


def _model_params(version: str, encoder_id: str, dim: int) -> dict[str, object]:
    """A loadable model document (rollback loads the model to run the canary on it)."""
    import numpy as np

    from moderation.matching.classifier.features import FEATURE_NAMES
    from moderation.matching.classifier.model import CopyModel

    k = len(FEATURE_NAMES)
    zeros = np.zeros(k)
    return CopyModel(
        version,
        encoder_id,
        tuple(FEATURE_NAMES),
        zeros,
        np.ones(k),
        zeros,
        0.0,
        1.0,
        0.0,
        np.zeros((0, dim), np.float32),
    ).to_json()


def test_classifier_rollback(cli: Cli) -> None:
    cli("init")
    now = datetime.now(UTC)
    with _runtime(cli) as rt, transaction(rt.sessions) as db:
        encoder_id = str(rt.encoder.id)
        for version, age, active in (("v1", 2, False), ("v2", 1, True)):
            db.add(
                ClassifierModel(
                    version=version,
                    encoder_id=encoder_id,
                    params=_model_params(version, encoder_id, rt.encoder.dim),
                    active=active,
                    created_at=now - timedelta(hours=age),
                )
            )
    assert _out(cli("classifier", "rollback")) == {"previous": "v2", "active": "v1"}
    nothing = cli("classifier", "rollback", ok=False)
    assert nothing.exit_code == 1 and "no model older" in nothing.stderr
    assert _out(cli("classifier", "rollback", "--to", "v2")) == {"previous": "v1", "active": "v2"}
    unknown = cli("classifier", "rollback", "--to", "v9", ok=False)
    assert unknown.exit_code == 1 and "v9" in unknown.stderr
    with _runtime(cli) as rt, rt.sessions() as db:
        assert db.scalars(select(ClassifierModel.version).where(ClassifierModel.active)).all() == [
            "v2"
        ]
    assert [e.target for e in _events(cli, "classifier.rollback")] == [
        "classifier:v1",
        "classifier:v2",
    ]
