"""The console's bank administration on the command line: ``moderation bank
rename|enable|disable|delete|remove-entries`` and ``moderation approvals list|approve|reject``.

Each command calls the library function the console view calls. Removing entries or a bank is
the console's two-person rule (:mod:`moderation.governance.approvals`): one admin files the
request, a different active admin approves it. Those commands act as a console admin named by
``--as EMAIL`` (audited as ``user:<id>``, like the console); the others are audited as ``cli``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from moderation.cli import Context, echo_json, echo_rows, initialised_runtime, main, pass_ctx
from moderation.cli.core import bank

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from moderation.service.runtime import Runtime

ACTOR = "cli"
as_admin = click.option(
    "--as",
    "admin_email",
    required=True,
    help="The console admin this is done as (two-person rule: the approver must be another).",
)


def admin_id(session: Session, email: str) -> int:
    """The id of the console user with ``email``.

    Raises:
        click.UsageError: no such user.
    """
    from moderation.governance.users import get_user_by_email

    user = get_user_by_email(session, email)
    if user is None:
        raise click.UsageError(f"no console user {email!r}")
    return user.id


@contextmanager
def _approvals_runtime(ctx: Context) -> Iterator[Runtime]:
    from moderation.governance.approvals import ApprovalError

    with initialised_runtime(ctx, ApprovalError) as runtime:
        yield runtime


@bank.command("rename")
@click.argument("name")
@click.argument("new_name")
@pass_ctx
def bank_rename(ctx: Context, name: str, new_name: str) -> None:
    """Rename bank NAME to NEW_NAME (new snapshot version; check policies naming it)."""
    from moderation.banks.operations import rename_bank

    with initialised_runtime(ctx) as runtime:
        version = rename_bank(runtime, name, new_name, actor=ACTOR)
    echo_json({"bank": new_name, "previous_name": name, "snapshot_version": version})


def _set_bank_enabled(ctx: Context, name: str, enabled: bool) -> None:
    from moderation.banks.operations import set_bank_enabled

    with initialised_runtime(ctx) as runtime:
        version = set_bank_enabled(runtime, name, enabled=enabled, actor=ACTOR)
    echo_json({"bank": name, "enabled": enabled, "snapshot_version": version})


@bank.command("enable")
@click.argument("name")
@pass_ctx
def bank_enable(ctx: Context, name: str) -> None:
    """Match against bank NAME again."""
    _set_bank_enabled(ctx, name, True)


@bank.command("disable")
@click.argument("name")
@pass_ctx
def bank_disable(ctx: Context, name: str) -> None:
    """Stop matching against bank NAME (its entries stay)."""
    _set_bank_enabled(ctx, name, False)


def _request(ctx: Context, name: str, email: str, action: str, entry_ids: list[int]) -> None:
    from moderation.banks.records import get_bank
    from moderation.governance.approvals import request_removal
    from moderation.storage.db import transaction

    with _approvals_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        approval = request_removal(
            session,
            action=action,
            bank_id=get_bank(session, name).id,
            entry_ids=entry_ids,
            requested_by=admin_id(session, email),
        )
        row = {"approval_id": approval.id, "action": action, "state": approval.state}
    echo_json({**row, "note": "a second admin must approve: moderation approvals approve"})


@bank.command("delete")
@click.argument("name")
@as_admin
@pass_ctx
def bank_delete(ctx: Context, name: str, admin_email: str) -> None:
    """Request the deletion of bank NAME and all its entries (a second admin approves)."""
    from moderation.governance.approvals import DELETE_BANK

    _request(ctx, name, admin_email, DELETE_BANK, [])


@bank.command("remove-entries")
@click.argument("name")
@click.argument("entry_ids", nargs=-1, required=True)
@as_admin
@pass_ctx
def bank_remove_entries(
    ctx: Context, name: str, entry_ids: tuple[str, ...], admin_email: str
) -> None:
    """Request the removal of entries ENTRY_IDS (e_<n>) from bank NAME (a second admin
    approves)."""
    from moderation.banks.records import parse_entry_id
    from moderation.governance.approvals import DELETE_ENTRIES

    with initialised_runtime(ctx):
        ids = [parse_entry_id(e) for e in entry_ids]
    _request(ctx, name, admin_email, DELETE_ENTRIES, ids)


@main.group()
def approvals() -> None:
    """Two-person-rule requests (bank and entry removals): list, approve, reject."""


@approvals.command("list")
@click.option("--all", "show_all", is_flag=True, help="Decided requests too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per request.")
@pass_ctx
def approvals_list(ctx: Context, show_all: bool, as_json: bool) -> None:
    """Removal requests, newest first (pending ones unless --all)."""
    from moderation.governance.approvals import list_approvals

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        views = list_approvals(session, state=None if show_all else "pending")
    rows = [
        {
            "approval_id": v.approval_id,
            "action": v.action,
            "bank": v.params.get("bank"),
            "entries": len(v.params.get("entry_ids", [])),
            "requested_by": v.requester_email,
            "state": v.state,
            "created_at": v.created_at.isoformat(timespec="seconds"),
        }
        for v in views
    ]
    echo_rows(rows, list(rows[0]) if rows else ["approval_id", "state"], as_json=as_json)


@approvals.command("approve")
@click.argument("approval_id", type=int)
@as_admin
@pass_ctx
def approvals_approve(ctx: Context, approval_id: int, admin_email: str) -> None:
    """Approve request APPROVAL_ID and carry it out (not your own request)."""
    from moderation.governance.approvals import approve

    with _approvals_runtime(ctx) as runtime:
        with runtime.sessions() as session:
            approver = admin_id(session, admin_email)
        version = approve(runtime, approval_id, approver_id=approver)
    echo_json({"approval_id": approval_id, "state": "approved", "snapshot_version": version})


@approvals.command("reject")
@click.argument("approval_id", type=int)
@as_admin
@pass_ctx
def approvals_reject(ctx: Context, approval_id: int, admin_email: str) -> None:
    """Reject request APPROVAL_ID (or withdraw your own); nothing is removed."""
    from moderation.governance.approvals import reject
    from moderation.storage.db import transaction

    with _approvals_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        reject(session, approval_id, approver_id=admin_id(session, admin_email))
    echo_json({"approval_id": approval_id, "state": "rejected"})
