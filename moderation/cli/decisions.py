"""``moderation decisions``: statements of reasons (EU DSA Art. 17) of every decision."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from moderation.cli import Context, initialised_runtime, main, pass_ctx
from moderation.cli.audit import _parse_time

ACTOR = "cli"


@main.group()
def decisions() -> None:
    """Decisions and their statements of reasons (screening, reviewer, appeal)."""


@decisions.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    required=True,
    help="csv (header row; booleans true/false) or jsonl (one JSON object a line).",
)
@click.option("--since", default=None, help="From this time (ISO 8601, UTC when no zone).")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here instead of standard output.",
)
@pass_ctx
def decisions_export(ctx: Context, fmt: str, since: str | None, out_path: Path | None) -> None:
    """Export every decision's statement of reasons: decision ground, automated detection and
    decision (yes/no), content type, category, source, decider and time; audited."""
    from moderation.matching.statements import export_decisions
    from moderation.storage.db import transaction

    start = _parse_time(since, "--since")
    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        if out_path is None:
            count = export_decisions(session, sys.stdout, fmt=fmt, since=start, actor=ACTOR)
        else:
            with open(out_path, "w", encoding="utf-8", newline="") as out:
                count = export_decisions(session, out, fmt=fmt, since=start, actor=ACTOR)
    click.echo(f"exported {count} decisions", err=True)
