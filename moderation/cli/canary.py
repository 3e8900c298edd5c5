"""Model-operations commands: ``moderation canary add|run|status`` and ``moderation drift run``."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.cli import Context, echo_json, initialised_runtime, main, pass_ctx


@main.group()
def canary() -> None:
    """The golden-set canary: labelled copies and negatives screened end to end, held to the
    policy's SLOs (slo.min_recall, slo.max_false_positive_rate)."""


@canary.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--label",
    required=True,
    type=click.Choice(["match", "no-match"]),
    help="match: a copy of an image in a block bank; no-match: must match nothing.",
)
@click.option("--bank", default=None, help="The bank a 'match' file must match (default: any).")
@pass_ctx
def canary_add(ctx: Context, file: Path, label: str, bank: str | None) -> None:
    """Add FILE to the golden set (sealed under its own key in <data_dir>/canary); audited."""
    from moderation.modelops.canary_items import CanaryItemError, add_labelled_file

    with initialised_runtime(ctx, CanaryItemError) as runtime:
        item_id = add_labelled_file(runtime, file, label=label, bank=bank, actor="cli")
    echo_json({"item": item_id, "label": label, "bank": bank})


@canary.command("run")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--encoder", "encoder_name", default=None, help="Measure this encoder (default: current)."
)
@pass_ctx
def canary_run(ctx: Context, as_json: bool, encoder_name: str | None) -> None:
    """Screen the golden set now and store the figures (µAP, recall at the block and review
    thresholds, false-positive rate); exit 1 when they miss the policy's SLOs."""
    from moderation.modelops.canary import CanaryError, record_run, run_canary

    with initialised_runtime(ctx, CanaryError) as runtime:
        report = run_canary(runtime, encoder_name=encoder_name)
        record_run(runtime, report, reason="manual", actor="cli")
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.summary())
        for failure in report.failures:
            click.echo(f"SLO missed: {failure}", err=True)
    if not report.passed_slo:
        raise SystemExit(1)


@canary.command("status")
@pass_ctx
def canary_status(ctx: Context) -> None:
    """The golden set's size and the latest run per encoder (JSON)."""
    from moderation.modelops.canary_items import golden_status
    from moderation.modelops.gauges import latest_runs

    with initialised_runtime(ctx) as runtime:
        runs = [
            {
                "encoder_id": row.encoder_id,
                "at": row.created_at.isoformat(timespec="seconds"),
                "reason": row.reason,
                "passed_slo": row.passed_slo,
                **row.figures,
            }
            for row in latest_runs(runtime)
        ]
        echo_json({"golden_set": golden_status(runtime), "latest_runs": runs})


@main.group()
def drift() -> None:
    """Drift monitoring: the last hour of uploads against a reference window."""


@drift.command("run")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--window", default=3600, show_default=True, type=click.IntRange(min=60), help="Seconds."
)
@pass_ctx
def drift_run(ctx: Context, as_json: bool, window: int) -> None:
    """Compare the last WINDOW seconds of screenings with the reference window (the 7 days
    before it), store a drift score per signal, and exit 1 when any is over its threshold."""
    from moderation.modelops.drift import run_drift

    with initialised_runtime(ctx) as runtime:
        report = run_drift(runtime, actor="cli", window_s=window)
    if as_json:
        echo_json(report.to_json())
    else:
        for signal in report.signals:
            flag = "DRIFT" if signal.drifted else "ok"
            click.echo(f"{signal.signal}: {signal.score:.3f} (threshold {signal.threshold}) {flag}")
    if report.drifted:
        raise SystemExit(1)
