"""Console user commands: ``moderation users create|list|disable|enable``."""

from __future__ import annotations

import sys

import click

from moderation.cli import (
    Context,
    echo_json,
    echo_rows,
    initialised_runtime,
    main,
    pass_ctx,
)


@main.group()
def users() -> None:
    """Manage admin console users (roles: admin, reviewer, auditor, dpo)."""


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

    line = sys.stdin.readline() if password_stdin else ""
    password = line[:-1] if line.endswith("\n") else line
    password = password[:-1] if password.endswith("\r") else password
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
