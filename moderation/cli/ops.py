"""``moderation status``: the figures the alert rules watch, and the checks that say an incident
is over (the runbooks in docs/runbooks/ end with it). Calls
:func:`moderation.governance.health_metrics.health_report`.
"""

from __future__ import annotations

import sys

import click

from moderation.cli import Context, echo_json, initialised_runtime, main, pass_ctx


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 naming each problem: an upload waiting too long, a snapshot that does not "
    "decrypt and verify, no worker, a worker with an error or an old snapshot, an overdue "
    "erasure request.",
)
@click.option(
    "--max-wait",
    type=float,
    default=300.0,
    show_default=True,
    help="Longest acceptable wait of a queued upload, s (the queue alert's threshold).",
)
@pass_ctx
def status(ctx: Context, as_json: bool, check: bool, max_wait: float) -> None:
    """Queue, snapshot (decrypted and verified now), workers, key ages and overdue erasure
    requests, read from the database every machine shares."""
    from moderation.governance.health_metrics import health_report

    with initialised_runtime(ctx) as runtime:
        report = health_report(runtime, max_wait_s=max_wait)
    if as_json:
        echo_json(report)
    else:
        snapshot = report["snapshot"]
        click.echo(
            f"uploads waiting: {report['uploads_waiting']} "
            f"(oldest {report['oldest_queued_upload_s']:.0f} s)\n"
            f"snapshot: v{snapshot['version']} "
            f"{'verified' if snapshot['verified'] else 'NOT VERIFIED'}\n"
            f"workers alive: {len(report['workers'])}\n"
            f"primary key: {report['primary_key']}\n"
            f"overdue erasure requests: {report['overdue_erasures']}"
        )
    for problem in report["problems"]:
        click.echo(f"problem: {problem}", err=True)
    if check and not report["ok"]:
        sys.exit(1)
