"""Classifier-stage commands: ``moderation classifier train|list|rollback``."""

from __future__ import annotations

import click

from moderation.cli import Context, echo_json, initialised_runtime, main, pass_ctx, print_table


@main.group()
def classifier() -> None:
    """Train and inspect the classifier stage (calibrated copy probability)."""


@classifier.command("train")
@click.option(
    "--regularisation",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=1e-6),
    help="Inverse L2 strength of the logistic regression (scikit-learn's C).",
)
@pass_ctx
def classifier_train(ctx: Context, regularisation: float) -> None:
    """Retrain from synthetic (bank import) and review-decision labelled pairs; prints held-out
    figures before (active model) and after (new model). A worse model, or one whose golden-set
    canary figures miss the policy's SLOs (the reason gives them), is stored but not activated
    (exit 1); both outcomes are audited."""
    from moderation.matching.classifier.training import train
    from moderation.modelops.canary import canary_gate

    with initialised_runtime(ctx, ValueError) as runtime:
        report = train(
            runtime, actor="cli", regularisation=regularisation, gate=canary_gate(runtime)
        )
    echo_json(report.to_json())
    if not report.activated:
        raise SystemExit(1)


@classifier.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def classifier_list(ctx: Context, as_json: bool) -> None:
    """Stored models, newest first, with their held-out figures and which one is active."""
    from sqlalchemy import select

    from moderation.storage.models import ClassifierModel

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = [
            {
                "version": row.version,
                "active": row.active,
                "encoder_id": row.encoder_id,
                "average_precision": (row.metrics or {})
                .get("held_out", {})
                .get("average_precision"),
                "created_at": row.created_at.isoformat(timespec="seconds"),
            }
            for row in session.scalars(
                select(ClassifierModel).order_by(ClassifierModel.created_at.desc())
            )
        ]
    if as_json:
        echo_json(rows)
    else:
        print_table(rows, ["version", "active", "average_precision", "created_at"])


@classifier.command("rollback")
@click.option("--to", "version", default=None, help="Version to activate (see `list`).")
@pass_ctx
def classifier_rollback(ctx: Context, version: str | None) -> None:
    """Make an earlier model active again (default: the newest one older than the active);
    workers switch without a restart. Prints {"previous", "active"}. A model whose golden-set
    canary figures miss the policy's SLOs is refused (exit 1) with the figures; audited."""
    from moderation.matching.classifier.activation import (
        RollbackError,
        rollback_model,
        rollback_target,
    )
    from moderation.matching.classifier.model import ModelFormatError
    from moderation.modelops.canary import canary_gate
    from moderation.storage.db import transaction

    with initialised_runtime(ctx, RollbackError, ModelFormatError) as runtime:
        encoder_id = str(runtime.encoder.id)
        with runtime.sessions() as session:
            target = rollback_target(session, encoder_id=encoder_id, to=version)
        verdict = canary_gate(runtime)(target)
        with transaction(runtime.sessions) as session:
            result = rollback_model(
                session, encoder_id=encoder_id, to=target.version, actor="cli", verdict=verdict
            )
    echo_json(result)
    if "refused" in result:
        raise SystemExit(1)
    runtime.notify_change("classifier")  # the canary measures the model now active
