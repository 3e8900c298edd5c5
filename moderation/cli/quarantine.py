"""Flood-control commands: ``bank quarantined``, ``bank confirm-entry``, ``bank release-entry``
and ``bank check-flood`` (:mod:`moderation.banks.flood_control`)."""

from __future__ import annotations

import click

from moderation.cli import Context, echo_json, echo_rows, initialised_runtime, pass_ctx
from moderation.cli.core import bank


@bank.command("quarantined")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_ctx
def bank_quarantined(ctx: Context, as_json: bool) -> None:
    """List quarantined (noisy) entries with the figures that quarantined them."""
    from moderation.banks.flood_control import list_quarantined

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = list_quarantined(session, runtime.keyring)
    echo_rows(
        rows,
        ["entry_id", "bank", "label", "quarantined_at", "matches_today", "reason"],
        as_json=as_json,
    )


@bank.command("confirm-entry")
@click.argument("entry_id")
@pass_ctx
def bank_confirm_entry(ctx: Context, entry_id: str) -> None:
    """Keep quarantined entry ENTRY_ID (e_<n>) matching normally; flood control leaves it alone
    for the rest of the UTC day."""
    from moderation.banks.flood_control import confirm_entry

    with initialised_runtime(ctx) as runtime:
        echo_json(confirm_entry(runtime, entry_id, actor="cli"))


@bank.command("release-entry")
@click.argument("entry_id")
@pass_ctx
def bank_release_entry(ctx: Context, entry_id: str) -> None:
    """Release quarantined entry ENTRY_ID (e_<n>) from matching: it is disabled (``bank
    enable-entry`` undoes it)."""
    from moderation.banks.flood_control import release_entry

    with initialised_runtime(ctx) as runtime:
        echo_json(release_entry(runtime, entry_id, actor="cli"))


@bank.command("check-flood")
@pass_ctx
def bank_check_flood(ctx: Context) -> None:
    """Run the flood-control check now (Celery beat runs it every 5 minutes)."""
    from dataclasses import asdict

    from moderation.banks.flood_control import check_flood

    with initialised_runtime(ctx) as runtime:
        for figures in check_flood(runtime, actor="cli"):
            echo_json(asdict(figures))
