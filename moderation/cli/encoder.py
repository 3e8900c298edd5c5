"""Encoder upgrade commands: ``moderation encoder migrate TARGET|status|promote|rollback``
(:mod:`moderation.modelops.encoder_migration`, :mod:`moderation.modelops.encoder_promotion`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from moderation.cli import Context, echo_json, initialised_runtime, main, pass_ctx, print_table
from moderation.cli.core import benchmark, protocol_options


@main.group()
def encoder() -> None:
    """Upgrade the encoder blue-green: migrate, watch the shadow, promote, roll back."""


@encoder.command("migrate")
@click.argument("target")
@click.option(
    "--wait",
    is_flag=True,
    help="Build the target's snapshots in this process instead of leaving it to the workers' "
    "background job (Celery beat, maintenance queue).",
)
@pass_ctx
def encoder_migrate(ctx: Context, target: str, wait: bool) -> None:
    """Start building a second set of bank snapshots embedded with encoder TARGET (e.g.
    open_clip/ViT-B-32//srv/models/vitb32.pt) from the retained originals. The current encoder
    keeps deciding; workers screen each upload with TARGET too and record its decision as
    shadow. Resumable: a worker restart only delays it."""
    from moderation.modelops.encoder_migration import (
        MigrationError,
        run_migration,
        start_migration,
    )

    with initialised_runtime(ctx, MigrationError, ValueError, FileNotFoundError) as runtime:
        progress = start_migration(runtime, target, actor="cli")
        if wait:
            progress = run_migration(
                runtime,
                progress.migration_id,
                progress=lambda p: click.echo(f"{p.done}/{p.total} originals embedded", err=True),
            )
    echo_json(asdict(progress))


@encoder.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
@click.option(
    "--canary/--no-canary",
    default=True,
    show_default=True,
    help="Run the golden-set canary for both encoders (takes a while on large sets).",
)
@pass_ctx
def encoder_status_cmd(ctx: Context, as_json: bool, canary: bool) -> None:
    """Serving and target encoder, migration progress, how each bank is matched, shadow
    agreement (uploads whose decision would change, by category), workers' encoders and both
    encoders' canary figures."""
    from moderation.modelops.encoder_status import encoder_status

    with initialised_runtime(ctx) as runtime:
        status = encoder_status(runtime, canary=canary)
    if as_json:
        echo_json(status)
        return
    migration = status["migration"] or {}
    click.echo(f"serving: {status['serving']}  shadow: {status['shadow'] or '-'}")
    if migration:
        progress = migration["progress"]
        click.echo(
            f"migration {migration['id']} -> {migration['target']}: {migration['state']}, "
            f"{progress['done']}/{progress['total']} originals embedded"
        )
    print_table(status["banks"], ["bank", "retain_originals", "originals", "matched_by"])
    if status["shadow_agreement"]:
        agreement = status["shadow_agreement"]
        click.echo(f"shadow: {agreement['uploads']} uploads, {agreement['changed']} would change")


@encoder.command("promote")
@pass_ctx
def encoder_promote(ctx: Context) -> None:
    """Serve with the migration's target encoder: every running worker switches within its
    snapshot poll interval, without restart. Refused (exit 1, with the figures) when the
    target is below the policy's canary SLOs."""
    from moderation.modelops.encoder_migration import MigrationError
    from moderation.modelops.encoder_promotion import promote

    with initialised_runtime(ctx, MigrationError) as runtime:
        switch = promote(runtime, actor="cli")
    echo_json(asdict(switch))


@encoder.command("rollback")
@pass_ctx
def encoder_rollback(ctx: Context) -> None:
    """Serve with the previous encoder again (its snapshots were kept): every running worker
    switches back within its snapshot poll interval."""
    from moderation.modelops.encoder_migration import MigrationError
    from moderation.modelops.encoder_promotion import rollback

    with initialised_runtime(ctx, MigrationError) as runtime:
        switch = rollback(runtime, actor="cli")
    echo_json(asdict(switch))


@benchmark.command("encoder-upgrade")
@click.option("--target", help="Encoder to migrate to (an encoder name, as for migrate).")
@click.option(
    "--random-open-clip",
    "random_open_clip",
    metavar="ARCH",
    help="Instead of --target: a randomly initialised open_clip ARCH (e.g. ViT-B-32), built "
    "here; its compute is the real model's, its decisions meaningless (timing only).",
)
@click.option("--entries", default=200, show_default=True, help="Bank entries to migrate.")
@click.option("--uploads", default=60, show_default=True, help="Uploads screened per variant.")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Photos (default: ../shared/data/photos-dev, else scikit-image's photos).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_encoder_upgrade(
    ctx: Context,
    target: str | None,
    random_open_clip: str | None,
    entries: int,
    uploads: int,
    images_dir: Path | None,
    json_out: Path | None,
) -> None:
    """Encoder-upgrade figures in one run on a private data directory: migration throughput
    (entries/s) and the shadow overhead on screening (time per upload with the shadow over
    without)."""
    from moderation.benchmark.encoder_upgrade import run_encoder_upgrade_benchmark
    from moderation.cli import config_errors

    with config_errors():
        try:
            report = run_encoder_upgrade_benchmark(
                ctx.settings,
                target=target,
                random_open_clip=random_open_clip,
                entries=entries,
                uploads=uploads,
                images_dir=images_dir,
                echo=lambda line: click.echo(line, err=True),
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    echo_json(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))


@benchmark.command("encoders")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of photos: references and queries are drawn from it.",
)
@click.option(
    "--encoders",
    "encoder_names",
    default="timm/efficientnet_lite0,timm/efficientnet_lite1,timm/efficientnet_lite2",
    show_default=True,
    help="Comma-separated encoder names; the first is the baseline of the throughput ratios.",
)
@protocol_options("Also run each encoder's classifier stage (trains one model per encoder).")
@click.option(
    "--window-ablation",
    is_flag=True,
    help="Also run each encoder's classifier stage with query windows switched the other way "
    "(MODERATION_CLASSIFIER_WINDOWS).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_encoders(
    ctx: Context,
    images_dir: Path,
    encoder_names: str,
    n_references: int,
    per_edit: int,
    seed: int,
    classifier: bool,
    window_ablation: bool,
    json_out: Path | None,
) -> None:
    """Encoders compared in one run on the quality protocol: µAP, recall at precision 0.99 and
    interleaved screening images/s of each (moderation/benchmark/encoder_compare.py)."""
    from moderation.benchmark.encoder_compare import run_encoder_comparison
    from moderation.cli import config_errors

    names = [name.strip() for name in encoder_names.split(",") if name.strip()]
    with config_errors():
        try:
            run_encoder_comparison(
                ctx.settings,
                images_dir,
                names,
                n_references=n_references,
                per_edit=per_edit,
                seed=seed,
                classifier=classifier,
                window_ablation=window_ablation,
                json_out=json_out,
                echo=click.echo,
            )
        except (ValueError, ModuleNotFoundError) as exc:
            raise click.UsageError(str(exc)) from None
