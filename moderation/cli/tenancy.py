"""Tenant-isolation commands: ``bank share | unshare | set-owner | sharing``, ``api-client
set-policy`` and ``users set-client`` (:mod:`moderation.banks.tenancy`, issue 14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from moderation.cli import Context, echo_json, initialised_runtime, pass_ctx
from moderation.cli.api_clients import api_client
from moderation.cli.core import bank
from moderation.cli.users import users

_client_option = click.option(
    "--client", "client", default=None, metavar="NAME", help="The API client."
)
_all_option = click.option("--all", "all_clients", is_flag=True, help="Every API client.")


def _target(client: str | None, all_clients: bool) -> str | None:
    """The client name, or None for --all; exactly one must be given."""
    if (client is None) == (not all_clients):
        raise click.UsageError("give exactly one of --client NAME and --all")
    return client


def _change_sharing(
    ctx: Context, change: Callable[..., Any], name: str, client: str | None
) -> None:
    from moderation.banks.tenancy import sharing_of
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        changed = change(session, name, client, actor="cli")
        echo_json({"bank": changed.name, **sharing_of(session, changed)})


@bank.command("share")
@click.argument("name")
@_client_option
@_all_option
@pass_ctx
def bank_share(ctx: Context, name: str, client: str | None, all_clients: bool) -> None:
    """Share bank NAME with one API client (--client) or every client (--all): its entries
    then match that client's uploads and its name and labels appear in its results."""
    from moderation.banks.tenancy import share_bank

    _change_sharing(ctx, share_bank, name, _target(client, all_clients))


@bank.command("unshare")
@click.argument("name")
@_client_option
@_all_option
@pass_ctx
def bank_unshare(ctx: Context, name: str, client: str | None, all_clients: bool) -> None:
    """Stop sharing bank NAME with one API client (--client) or with all (--all; clients it is
    shared with one by one keep it). Its owner keeps it."""
    from moderation.banks.tenancy import unshare_bank

    _change_sharing(ctx, unshare_bank, name, _target(client, all_clients))


@bank.command("set-owner")
@click.argument("name")
@_client_option
@click.option("--deployment", is_flag=True, help="Give the bank back to the deployment.")
@pass_ctx
def bank_set_owner(ctx: Context, name: str, client: str | None, deployment: bool) -> None:
    """Make API client --client the owner of bank NAME (or --deployment: no owner)."""
    from moderation.banks.tenancy import set_owner

    _change_sharing(ctx, set_owner, name, _target(client, deployment))


@bank.command("sharing")
@click.argument("name")
@pass_ctx
def bank_sharing(ctx: Context, name: str) -> None:
    """Show who owns bank NAME and whom it is shared with."""
    from moderation.banks.records import get_bank
    from moderation.banks.tenancy import sharing_of

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        found = get_bank(session, name)
        echo_json({"bank": found.name, **sharing_of(session, found)})


@api_client.command("set-policy")
@click.argument("name")
@click.argument("policy", required=False)
@pass_ctx
def api_client_set_policy(ctx: Context, name: str, policy: str | None) -> None:
    """Screen API client NAME's uploads under POLICY (``policies/<POLICY>.yaml``, validated);
    without POLICY, under the deployment's active policy again."""
    from moderation.service.tenancy import set_client_policy
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        set_client_policy(session, runtime, name, policy, actor="cli")
    echo_json({"client": name, "policy": policy})


@users.command("set-client")
@click.argument("email")
@click.argument("client", required=False)
@pass_ctx
def users_set_client(ctx: Context, email: str, client: str | None) -> None:
    """Scope reviewer EMAIL to API client CLIENT's review items only (without CLIENT: every
    client's)."""
    from moderation.governance.review import ReviewError
    from moderation.governance.tenancy import set_reviewer_client
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime:
        try:
            with transaction(runtime.sessions) as session:
                set_reviewer_client(session, email, client, actor="cli")
        except ReviewError as exc:
            raise click.UsageError(str(exc)) from None
    echo_json({"user": email, "client": client})
