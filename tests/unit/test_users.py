"""Console users: argon2id hashes (W5), TOTP with reuse rejection (W6), encrypted TOTP secrets,
and the ``moderation users`` CLI."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pyotp
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from moderation.config import Settings
from moderation.governance.users import (
    TOTP_INTERVAL,
    UserError,
    authenticate,
    create_user,
    set_disabled,
    totp_code,
    verify_password,
    verify_totp,
)
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, User

PASSWORD = "correct horse battery staple"


def _create(runtime: Any, email: str, role: str, **kw: Any) -> Any:
    with transaction(runtime.sessions) as db:
        return create_user(
            db, runtime.keyring, email=email, role=role, password=PASSWORD, actor="test", **kw
        )


def _user(runtime: Any, user_id: int) -> User:
    with runtime.sessions() as db:
        user = db.get(User, user_id)
        assert user is not None
        return user


def test_w5_password_hash_is_argon2id_with_enough_memory_and_passes(runtime: Any) -> None:
    created = _create(runtime, "a@example.org", "reviewer")
    stored = _user(runtime, created.user_id).password_hash
    match = re.fullmatch(r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+", stored)
    assert match, stored
    memory_kib, time_cost, _parallel = (int(g) for g in match.groups())
    assert memory_kib >= 19 * 1024
    assert time_cost >= 2
    assert PASSWORD not in stored


def test_authenticate(runtime: Any) -> None:
    created = _create(runtime, "Rev@Example.org", "reviewer")
    with transaction(runtime.sessions) as db:
        assert authenticate(db, "rev@example.org", PASSWORD) is not None
        assert authenticate(db, "  REV@example.org ", PASSWORD) is not None
        assert authenticate(db, "rev@example.org", PASSWORD + "x") is None
        assert authenticate(db, "nobody@example.org", PASSWORD) is None
        assert authenticate(db, "not an address", PASSWORD) is None
        set_disabled(db, created.user_id, disabled=True, actor="test")
    with transaction(runtime.sessions) as db:
        assert authenticate(db, "rev@example.org", PASSWORD) is None
        user = db.get(User, created.user_id)
        assert user is not None and verify_password(user, PASSWORD)


@pytest.mark.parametrize(
    ("email", "role", "password", "totp", "message"),
    [
        ("x@example.org", "admin", PASSWORD, False, "requires TOTP"),
        ("x@example.org", "dpo", PASSWORD, False, "requires TOTP"),
        ("x@example.org", "root", PASSWORD, None, "role must be"),
        ("not-an-email", "reviewer", PASSWORD, None, "e-mail"),
        ("x@example.org", "reviewer", "short", None, "at least 8"),
    ],
)
def test_create_user_refusals(
    runtime: Any, email: str, role: str, password: str, totp: bool | None, message: str
) -> None:
    with pytest.raises(UserError, match=message), transaction(runtime.sessions) as db:
        create_user(
            db, runtime.keyring, email=email, role=role, password=password, totp=totp, actor="t"
        )


def test_duplicate_email_is_refused(runtime: Any) -> None:
    _create(runtime, "dup@example.org", "auditor")
    with pytest.raises(UserError, match="already exists"):
        _create(runtime, "DUP@example.org", "reviewer")


def test_totp_is_set_up_where_required_and_on_request(runtime: Any) -> None:
    admin = _create(runtime, "admin@example.org", "admin")
    dpo = _create(runtime, "dpo@example.org", "dpo")
    reviewer = _create(runtime, "rev@example.org", "reviewer")
    auditor = _create(runtime, "aud@example.org", "auditor", totp=True)
    for created in (admin, dpo, auditor):
        assert created.totp_uri and created.totp_uri.startswith("otpauth://totp/")
        assert "issuer=moderation" in created.totp_uri
    assert reviewer.totp_uri is None
    assert _user(runtime, reviewer.user_id).totp_secret is None
    with runtime.sessions() as db:
        actions = db.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
    assert actions.count("user.create") == 4
    assert actions.count("user.totp_enrol") == 3


def test_totp_secret_is_stored_encrypted(runtime: Any) -> None:
    created = _create(runtime, "admin@example.org", "admin")
    secret_b32 = re.search(r"secret=([A-Z2-7]+)", created.totp_uri).group(1)  # type: ignore[union-attr]
    secret = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    stored = _user(runtime, created.user_id).totp_secret
    assert stored is not None
    assert secret not in stored and secret_b32.encode() not in stored
    # The URI's secret and the stored one agree: the app accepts the authenticator's code.
    code = pyotp.TOTP(secret_b32).now()
    with transaction(runtime.sessions) as db:
        assert verify_totp(db, runtime.keyring, created.user_id, code)


def test_w6_totp_code_is_accepted_once(runtime: Any) -> None:
    created = _create(runtime, "admin@example.org", "admin")
    user = _user(runtime, created.user_id)
    now = datetime.now(UTC)
    code = totp_code(runtime.keyring, user, at=now)
    with transaction(runtime.sessions) as db:
        assert verify_totp(db, runtime.keyring, created.user_id, code, at=now)
    with transaction(runtime.sessions) as db:
        assert not verify_totp(db, runtime.keyring, created.user_id, code, at=now)
        # Still rejected within its drift window, from a "later" request.
        later = now + timedelta(seconds=TOTP_INTERVAL)
        assert not verify_totp(db, runtime.keyring, created.user_id, code, at=later)
        # The next step's code works once.
        next_code = totp_code(runtime.keyring, user, at=later)
        assert verify_totp(db, runtime.keyring, created.user_id, next_code, at=later)
        # An older step's code is refused even if never used (the counter only moves forward).
        older = totp_code(runtime.keyring, user, at=now - timedelta(seconds=TOTP_INTERVAL))
        assert not verify_totp(db, runtime.keyring, created.user_id, older, at=later)


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "12 34 5"])
def test_malformed_totp_codes_are_rejected(runtime: Any, code: str) -> None:
    created = _create(runtime, "admin@example.org", "admin")
    with transaction(runtime.sessions) as db:
        assert not verify_totp(db, runtime.keyring, created.user_id, code)


def test_totp_far_from_now_is_rejected(runtime: Any) -> None:
    created = _create(runtime, "admin@example.org", "admin")
    user = _user(runtime, created.user_id)
    stale = totp_code(runtime.keyring, user, at=datetime.now(UTC) - timedelta(minutes=5))
    fresh = totp_code(runtime.keyring, user)
    with transaction(runtime.sessions) as db:
        assert stale == fresh or not verify_totp(db, runtime.keyring, created.user_id, stale)


def test_key_rotation_rewraps_totp_secrets(runtime: Any) -> None:
    from moderation.governance.keys import rewrap_all

    created = _create(runtime, "admin@example.org", "admin")
    before = _user(runtime, created.user_id).totp_secret
    ring = runtime.keyring.with_new_primary()
    with transaction(runtime.sessions) as db:
        report = rewrap_all(db, ring, runtime.settings.snapshots_dir, actor="test")
    assert report.rewrapped["user_totp_secrets"] == 1
    after = _user(runtime, created.user_id)
    assert after.totp_secret != before
    code = totp_code(ring, after)
    with transaction(runtime.sessions) as db:
        assert verify_totp(db, ring, created.user_id, code)


# --- CLI ------------------------------------------------------------------------------------


def _cli(settings: Settings, args: list[str], stdin: str | None = None) -> Any:
    from moderation.cli import main

    env = {"MODERATION_DATA_DIR": str(settings.data_dir)}
    return CliRunner().invoke(main, args, input=stdin, env=env, catch_exceptions=False)


def test_cli_users_create_prints_user_id_and_totp_uri(runtime: Any, settings: Settings) -> None:
    result = _cli(
        settings,
        ["users", "create", "boss@example.org", "--role", "admin", "--password-stdin"],
        PASSWORD + "\n",
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed) == {"user_id", "totp_uri"}
    assert printed["totp_uri"].startswith("otpauth://totp/")
    with transaction(runtime.sessions) as db:
        user = authenticate(db, "boss@example.org", PASSWORD)
        assert user is not None and user.id == printed["user_id"] and user.role == "admin"

    reviewer = _cli(
        settings,
        ["users", "create", "rev@example.org", "--role", "reviewer", "--password-stdin"],
        PASSWORD + "\r\n",
    )
    assert reviewer.exit_code == 0, reviewer.output
    assert json.loads(reviewer.stdout.strip().splitlines()[-1])["totp_uri"] is None
    with transaction(runtime.sessions) as db:
        assert authenticate(db, "rev@example.org", PASSWORD) is not None

    listed = _cli(settings, ["users", "list", "--json"])
    rows = [json.loads(line) for line in listed.stdout.strip().splitlines()]
    assert {(r["email"], r["role"], r["totp"]) for r in rows} == {
        ("boss@example.org", "admin", True),
        ("rev@example.org", "reviewer", False),
    }


def test_cli_users_create_refusals(runtime: Any, settings: Settings) -> None:
    short = _cli(
        settings,
        ["users", "create", "x@example.org", "--role", "reviewer", "--password-stdin"],
        "short\n",
    )
    assert short.exit_code == 2 and "at least 8" in short.output
    no_totp = _cli(
        settings,
        ["users", "create", "x@example.org", "--role", "dpo", "--no-totp", "--password-stdin"],
        PASSWORD + "\n",
    )
    assert no_totp.exit_code == 2 and "requires TOTP" in no_totp.output
    disabled = _cli(settings, ["users", "disable", "nobody@example.org"])
    assert disabled.exit_code == 2
