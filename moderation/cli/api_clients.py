"""``moderation api-client``: create, list, revoke, rotate-token, rotate-callback-secret,
set-allowlist (the console's "API clients" page calls the same library functions,
:mod:`moderation.service.api_clients`).

CLIENT is a client's name or id. New credentials are printed once, as JSON; every change is
one transaction with its audit event (actor ``cli``). Exit 1 for a refused operation (unknown
or revoked client, invalid allowlist prefix), 2 for usage errors, 3 for configuration errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from moderation.cli import Context, echo_json, echo_rows, initialised_runtime, main, pass_ctx

if TYPE_CHECKING:
    from sqlalchemy.orm import Session  # imported with the storage layer, when a command runs

ACTOR = "cli"
LIST_COLUMNS = (
    "client_id",
    "name",
    "state",
    "created_at",
    "last_used_at",
    "callback_allowlist",
)

T = TypeVar("T")


def _change(ctx: Context, work: Callable[[Session], T]) -> T:
    """Run ``work`` in one transaction; a refused operation (``ClientError``) exits 1."""
    from moderation.service.api_clients import ClientError
    from moderation.storage.db import transaction

    with initialised_runtime(ctx, ClientError) as runtime, transaction(runtime.sessions) as session:
        return work(session)


@main.group("api-client")
def api_client() -> None:
    """Upload-hook API clients: credentials, callback allowlists, revocation."""


@api_client.command("create")
@click.argument("name")
@click.option(
    "--callback-allowlist",
    "allowlist",
    multiple=True,
    help="URL prefix callbacks may go to (repeatable), e.g. https://hooks.example.com/moderation",
)
@pass_ctx
def api_client_create(ctx: Context, name: str, allowlist: tuple[str, ...]) -> None:
    """Create an API client; prints its token and callback secret (shown only once)."""
    from moderation.service.api_clients import ClientError, create_api_client
    from moderation.service.callback_urls import callback_policy
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime:
        try:
            with transaction(runtime.sessions) as session:
                created = create_api_client(
                    session,
                    runtime.keyring,
                    name,
                    callback_allowlist=allowlist,
                    actor=ACTOR,
                    policy=callback_policy(ctx.settings),
                )
        except ClientError as exc:
            raise click.UsageError(str(exc)) from exc
    echo_json(
        {
            "client_id": created.client_id,
            "name": created.name,
            "token": created.token,
            "callback_secret": created.callback_secret,
            "callback_allowlist": list(created.callback_allowlist),
        }
    )


@api_client.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per client.")
@pass_ctx
def api_client_list(ctx: Context, as_json: bool) -> None:
    """List clients: id, name, state (active, disabled, revoked), created, last used (to the
    minute), callback allowlist, revocation and rotation times (--json). No credentials."""
    from moderation.service.api_clients import list_api_clients

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = [info.as_row() for info in list_api_clients(session)]
    if not as_json:
        for row in rows:
            row["callback_allowlist"] = " ".join(row["callback_allowlist"])  # type: ignore[arg-type]
    echo_rows(rows, LIST_COLUMNS, as_json=as_json)


@api_client.command("revoke")
@click.argument("client")
@click.option("--yes", is_flag=True, help="Confirm: revocation is final.")
@pass_ctx
def api_client_revoke(ctx: Context, client: str, yes: bool) -> None:
    """Revoke CLIENT for good: its token is refused at once by every web process and its
    pending callbacks are dropped."""
    from moderation.service.api_clients import revoke_api_client

    if not yes:
        raise click.UsageError("revocation is final: add --yes")
    info = _change(ctx, lambda s: revoke_api_client(s, client, actor=ACTOR))
    echo_json(info.as_row())


@api_client.command("rotate-token")
@click.argument("client")
@pass_ctx
def api_client_rotate_token(ctx: Context, client: str) -> None:
    """Give CLIENT a new bearer token, printed once; the old token is refused at once."""
    from moderation.service.api_clients import find_client, rotate_token

    def work(session: Session) -> dict[str, object]:
        token = rotate_token(session, client, actor=ACTOR)
        row = find_client(session, client)
        return {"client_id": row.id, "name": row.name, "token": token}

    echo_json(_change(ctx, work))


@api_client.command("rotate-callback-secret")
@click.argument("client")
@pass_ctx
def api_client_rotate_callback_secret(ctx: Context, client: str) -> None:
    """Give CLIENT a new callback signing secret, printed once; callbacks sent from now on
    (retries included) are signed with it."""
    from moderation.service.api_clients import find_client, rotate_callback_secret

    def work(session: Session) -> dict[str, object]:
        runtime = ctx.runtime
        secret = rotate_callback_secret(session, runtime.keyring, client, actor=ACTOR)
        row = find_client(session, client)
        return {"client_id": row.id, "name": row.name, "callback_secret": secret}

    echo_json(_change(ctx, work))


@api_client.command("set-allowlist")
@click.argument("client")
@click.argument("prefixes", nargs=-1)
@click.option("--clear", is_flag=True, help="Empty the allowlist (no callbacks at all).")
@pass_ctx
def api_client_set_allowlist(
    ctx: Context, client: str, prefixes: tuple[str, ...], clear: bool
) -> None:
    """Replace CLIENT's callback allowlist with PREFIXES (https://host[:port][/path]; scheme,
    host and port must match exactly, the path is a prefix). Queued callbacks are re-checked
    against the new list."""
    from moderation.service.api_clients import find_client, set_allowlist
    from moderation.service.callback_urls import callback_policy

    if bool(prefixes) == clear:
        raise click.UsageError("give the URL prefixes, or --clear (not both)")
    policy = callback_policy(ctx.settings)

    def work(session: Session) -> dict[str, object]:
        allowlist = set_allowlist(session, client, prefixes, actor=ACTOR, policy=policy)
        row = find_client(session, client)
        return {"client_id": row.id, "name": row.name, "callback_allowlist": list(allowlist)}

    echo_json(_change(ctx, work))
