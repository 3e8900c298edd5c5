"""Console user commands: ``moderation users
create|list|disable|enable|set-role|reset-password|reset-totp``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from moderation.cli import (
    Context,
    echo_json,
    echo_rows,
    initialised_runtime,
    main,
    pass_ctx,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

ACTOR = "cli"


@main.group()
def users() -> None:
    """Manage admin console users (roles: admin, reviewer, auditor, dpo)."""


def _stdin_password() -> str:
    """The first line of standard input, without its line ending."""
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    return password[:-1] if password.endswith("\r") else password


@users.command("create")
@click.argument("email")
@click.option("--role", type=click.Choice(["admin", "reviewer", "auditor", "dpo"]), required=True)
@click.option(
    "--password-stdin",
    is_flag=True,
    required=True,
    help="Read the password from the first line of standard input.",
)
@click.option(
    "--totp/--no-totp",
    default=None,
    help="Set up TOTP (always on for admin and dpo; off by default for the others).",
)
@pass_ctx
def users_create(
    ctx: Context, email: str, role: str, password_stdin: bool, totp: bool | None
) -> None:
    """Create a console user; prints {"user_id", "totp_uri"} (the URI is shown only once)."""
    from moderation.governance.users import UserError, create_user
    from moderation.storage.db import transaction

    password = _stdin_password() if password_stdin else ""
    with initialised_runtime(ctx) as runtime:
        try:
            with transaction(runtime.sessions) as session:
                created = create_user(
                    session,
                    runtime.keyring,
                    email=email,
                    role=role,
                    password=password,
                    totp=totp,
                    actor="cli",
                )
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
    echo_json({"user_id": created.user_id, "totp_uri": created.totp_uri})


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per user.")
@pass_ctx
def users_list(ctx: Context, as_json: bool) -> None:
    """List console users."""
    from moderation.governance.users import has_totp, list_users

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = [
            {
                "user_id": u.id,
                "email": u.email,
                "role": u.role,
                "totp": has_totp(u),
                "disabled": u.disabled,
            }
            for u in list_users(session)
        ]
    echo_rows(rows, ["user_id", "email", "role", "totp", "disabled"], as_json=as_json)


def _set_disabled(ctx: Context, email: str, disabled: bool) -> None:
    from moderation.governance.users import get_user_by_email, set_disabled
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        user = get_user_by_email(session, email)
        if user is None:
            raise click.UsageError(f"no user {email!r}")
        set_disabled(session, user.id, disabled=disabled, actor="cli")
        echo_json({"user_id": user.id, "disabled": disabled})


@users.command("disable")
@click.argument("email")
@pass_ctx
def users_disable(ctx: Context, email: str) -> None:
    """Disable a user and end their console sessions."""
    _set_disabled(ctx, email, True)


@users.command("enable")
@click.argument("email")
@pass_ctx
def users_enable(ctx: Context, email: str) -> None:
    """Re-enable a disabled user."""
    _set_disabled(ctx, email, False)


def _user_id(session: Session, email: str) -> int:
    from moderation.governance.users import get_user_by_email

    user = get_user_by_email(session, email)
    if user is None:
        raise click.UsageError(f"no user {email!r}")
    return user.id


@users.command("set-role")
@click.argument("email")
@click.argument("role", type=click.Choice(["admin", "reviewer", "auditor", "dpo"]))
@pass_ctx
def users_set_role(ctx: Context, email: str, role: str) -> None:
    """Change the role of user EMAIL (their console sessions end)."""
    from moderation.governance.users import UserError, set_role
    from moderation.storage.db import transaction

    with (
        initialised_runtime(ctx, UserError) as runtime,
        transaction(runtime.sessions) as session,
    ):
        user = set_role(session, _user_id(session, email), role, actor=ACTOR)
        echo_json({"user_id": user.id, "role": user.role})


@users.command("reset-password")
@click.argument("email")
@click.option(
    "--password-stdin",
    is_flag=True,
    required=True,
    help="Read the new password from the first line of standard input.",
)
@pass_ctx
def users_reset_password(ctx: Context, email: str, password_stdin: bool) -> None:
    """Set a new password for user EMAIL (their console sessions end)."""
    from moderation.governance.users import UserError, reset_password
    from moderation.storage.db import transaction

    password = _stdin_password() if password_stdin else ""
    with (
        initialised_runtime(ctx, UserError) as runtime,
        transaction(runtime.sessions) as session,
    ):
        user = reset_password(session, _user_id(session, email), password, actor=ACTOR)
        echo_json({"user_id": user.id, "password_reset": True})


@users.command("reset-totp")
@click.argument("email")
@pass_ctx
def users_reset_totp(ctx: Context, email: str) -> None:
    """Give user EMAIL a new TOTP secret (lost authenticator); prints {"user_id", "totp_uri"}
    (shown only once: hand it to the user alone)."""
    from moderation.governance.users import UserError, reset_totp
    from moderation.storage.db import transaction

    with (
        initialised_runtime(ctx, UserError) as runtime,
        transaction(runtime.sessions) as session,
    ):
        user_id = _user_id(session, email)
        uri = reset_totp(session, runtime.keyring, user_id, actor=ACTOR)
    echo_json({"user_id": user_id, "totp_uri": uri})
