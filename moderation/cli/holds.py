"""Legal-hold commands: ``moderation hold place|release|list`` (the console's Legal holds page).

Holds placed here are ``manual`` holds (:mod:`moderation.governance.legal_holds`), audited with
the actor ``cli``; holds placed by a block or a reviewer's confirm end on expiry, released by the
beat task ``moderation.release_holds``.
"""

from __future__ import annotations

import click

from moderation.cli import Context, echo_json, echo_rows, initialised_runtime, main, pass_ctx

ACTOR = "cli"


@main.group()
def hold() -> None:
    """Place, release and list legal holds on uploads (kept through erasure until they end)."""


@hold.command("place")
@click.argument("upload_id")
@click.option(
    "--days", type=click.IntRange(1, 36500), required=True, help="How long the hold lasts."
)
@click.option("--reason", required=True, help="Why (e.g. the case or request number); audited.")
@pass_ctx
def hold_place(ctx: Context, upload_id: str, days: int, reason: str) -> None:
    """Hold upload UPLOAD_ID for DAYS days; prints the hold."""
    from moderation.governance.legal_holds import HoldError, hold_row, place_manual_hold
    from moderation.storage.db import transaction

    with (
        initialised_runtime(ctx, HoldError, ValueError) as runtime,
        transaction(runtime.sessions) as session,
    ):
        placed = place_manual_hold(session, upload_id, days=days, reason=reason, actor=ACTOR)
        row = hold_row(placed)
    echo_json(row)


@hold.command("release")
@click.argument("hold_id", type=int)
@click.option("--reason", required=True, help="Why the hold ends early; audited.")
@pass_ctx
def hold_release(ctx: Context, hold_id: int, reason: str) -> None:
    """Release manual hold HOLD_ID before its end (holds placed by blocks end on expiry)."""
    from moderation.governance.legal_holds import HoldError, hold_row, release_hold
    from moderation.storage.db import transaction

    with (
        initialised_runtime(ctx, HoldError, ValueError) as runtime,
        transaction(runtime.sessions) as session,
    ):
        row = hold_row(release_hold(session, hold_id, reason=reason, actor=ACTOR))
    echo_json(row)


@hold.command("list")
@click.option("--all", "include_released", is_flag=True, help="Include released holds.")
@click.option("--upload", "upload_id", default=None, help="Only the holds of this upload.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hold.")
@pass_ctx
def hold_list(ctx: Context, include_released: bool, upload_id: str | None, as_json: bool) -> None:
    """List legal holds, newest first (active ones unless --all)."""
    from moderation.governance.legal_holds import list_holds

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = list_holds(session, include_released=include_released, upload_id=upload_id)
    echo_rows(
        rows,
        ["hold_id", "upload_id", "source", "until", "placed_by", "reason", "released_at"],
        as_json=as_json,
    )
