"""Core commands: init, bank, hash, screen, keys, benchmark, demo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from moderation.cli import (
    Context,
    config_errors,
    echo_json,
    echo_rows,
    initialised_runtime,
    main,
    pass_ctx,
    print_table,
    stderr_console,
)

# --- init -----------------------------------------------------------------------------------


@main.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the data directory, the database schema and (dev only) a key file."""
    from moderation.audit.log import public_key_hex, record_event, signing_key
    from moderation.banks.sealed_fields import migration_attributes
    from moderation.crypto.keys import load_keyring
    from moderation.matching.policy import load_policy
    from moderation.storage.db import migrate, transaction

    settings = ctx.settings
    with config_errors():
        load_policy(settings.policies_dir, settings.policy)
        settings.ensure_dirs()
        had_key_file = settings.key_file_path.exists()
        keyring = load_keyring(settings, create_dev=True)
        runtime = ctx.runtime
        migrate(runtime.engine, attributes=migration_attributes(keyring))
        with transaction(runtime.sessions) as session:
            record_event(
                session,
                actor="cli",
                action="system.init",
                target=f"data_dir:{settings.resolved_data_dir}",
                details={"primary_key_id": keyring.primary_id},
            )
            audit_key = public_key_hex(signing_key(session, keyring, create=True, actor="cli"))
    source = "environment" if settings.master_keys else "key file"
    if settings.master_keys is None and not had_key_file:
        click.secho(
            f"WARNING: created a DEVELOPMENT key file at {settings.key_file_path}. "
            "Production deployments must set MODERATION_MASTER_KEYS (or a managed key file).",
            fg="yellow",
            err=True,
        )
    echo_json(
        {
            "data_dir": str(settings.resolved_data_dir),
            "database": settings.sqlalchemy_url.split("@")[-1],
            "keys": source,
            "primary_key_id": keyring.primary_id,
            "audit_public_key": audit_key,
            "policy": settings.policy,
        }
    )


# --- bank -----------------------------------------------------------------------------------


@main.group()
def bank() -> None:
    """Manage banks of known images and their entries."""


@bank.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(["block", "allow"]), default="block", show_default=True)
@click.option("--category", default="default", show_default=True)
@click.option(
    "--retain-originals",
    is_flag=True,
    help="Keep each entry's original, sealed under its own data key, so an encoder migration "
    "can re-embed it (entry removal and erasure crypto-shred it). A legal decision: banks of "
    "illegal content usually must not keep originals.",
)
@click.option(
    "--owner",
    default=None,
    metavar="CLIENT",
    help="API client owning the bank: it applies only to that client until shared "
    "(`bank share`). Without it the bank is the deployment's, shared with every client.",
)
@pass_ctx
def bank_create(
    ctx: Context, name: str, kind: str, category: str, retain_originals: bool, owner: str | None
) -> None:
    """Create a bank NAME."""
    from moderation.banks.records import create_bank_audited
    from moderation.banks.tenancy import client_named
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        owner_id = client_named(session, owner).id if owner is not None else None
        created = create_bank_audited(
            session,
            name,
            kind=kind,
            category=category,
            actor="cli",
            retain_originals=retain_originals,
            owner_client_id=owner_id,
        )
        echo_json(
            {
                "bank_id": created.id,
                "name": name,
                "kind": kind,
                "category": category,
                "retain_originals": retain_originals,
                "owner": owner,
            }
        )


@bank.command("import")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@pass_ctx
def bank_import(ctx: Context, name: str, paths: tuple[Path, ...]) -> None:
    """Import images (files, folders, zip files) into bank NAME; originals are not kept."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from moderation.banks.operations import import_bank

    with (
        initialised_runtime(ctx) as runtime,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
            console=stderr_console(),
        ) as bar,
    ):
        task = bar.add_task(f"importing into {name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = import_bank(runtime, name, list(paths), actor="cli", progress=progress)
    for ref, reason in report.skipped:
        click.echo(f"skipped {ref}: {reason}", err=True)
    echo_json(
        {
            "bank": report.bank,
            "added": len(report.added),
            "skipped": [{"source_ref": ref, "reason": reason} for ref, reason in report.skipped],
            "snapshot_version": report.snapshot_version,
            "training_pairs": report.training_pairs,
        }
    )


@bank.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per bank.")
@pass_ctx
def bank_list(ctx: Context, as_json: bool) -> None:
    """List banks with their entry counts."""
    from moderation.banks.operations import list_banks

    with initialised_runtime(ctx) as runtime:
        rows = list_banks(runtime)
    echo_rows(
        rows,
        ["name", "kind", "category", "enabled", "entries", "disabled_entries"],
        as_json=as_json,
    )


@bank.command("entries")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_ctx
def bank_entries(ctx: Context, name: str, as_json: bool) -> None:
    """List the entries of bank NAME (metadata only)."""
    from moderation.banks.operations import list_entries

    with initialised_runtime(ctx) as runtime:
        rows = list_entries(runtime, name)
    echo_rows(rows, ["entry_id", "label", "source_ref", "added_at", "disabled"], as_json=as_json)


def _set_entry_disabled(ctx: Context, entry_id: str, disabled: bool) -> None:
    from moderation.banks.operations import set_entry_disabled

    with initialised_runtime(ctx) as runtime:
        result = set_entry_disabled(runtime, entry_id, disabled=disabled, actor="cli")
    echo_json(result)


@bank.command("disable-entry")
@click.argument("entry_id")
@pass_ctx
def bank_disable_entry(ctx: Context, entry_id: str) -> None:
    """Stop matching entry ENTRY_ID (e_<n>); its signals stay in the encrypted snapshot."""
    _set_entry_disabled(ctx, entry_id, True)


@bank.command("enable-entry")
@click.argument("entry_id")
@pass_ctx
def bank_enable_entry(ctx: Context, entry_id: str) -> None:
    """Match entry ENTRY_ID (e_<n>) again."""
    _set_entry_disabled(ctx, entry_id, False)


# --- hash -----------------------------------------------------------------------------------


@main.command("hash")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
@pass_ctx
def hash_command(ctx: Context, paths: tuple[str, ...], as_json: bool) -> None:
    """Print the PDQ digest (ThreatExchange hex) and quality of each image."""
    from moderation.media.decode import DecodeLimits, UnscannableImage, decode_file
    from moderation.signals.pdq import pdq_hash

    limits = DecodeLimits.from_settings(ctx.settings)
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            decoded = decode_file(path, limits)
        except UnscannableImage as exc:
            rows.append({"path": path, "pdq": None, "quality": None, "reason": exc.reason})
            continue
        digest = pdq_hash(decoded.frames[0])
        rows.append({"path": path, "pdq": digest.hex, "quality": digest.quality})
    if as_json:
        for row in rows:
            echo_json(row)
        return
    for row in rows:
        click.echo(f"{row['pdq'] or 'unscannable:' + row['reason']} {row['quality']} {row['path']}")


# --- screen ---------------------------------------------------------------------------------


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input, one per line.")
@click.option("--subject-id", default=None, help="Data subject the uploads belong to.")
@click.option("--external-id-prefix", default="", help="Prefix for each upload's external id.")
@pass_ctx
def screen(
    ctx: Context,
    paths: tuple[str, ...],
    as_json: bool,
    subject_id: str | None,
    external_id_prefix: str,
) -> None:
    """Screen images against every enabled bank; exit 0 whatever the decisions."""
    from moderation.service.encoder_preload import preload_encoder
    from moderation.service.preparation import early_preparation
    from moderation.signals.encoders import runtime_for_job

    settings = ctx.settings
    runtime_name, threads = runtime_for_job(
        settings.encoder_runtime, settings.torch_threads, len(paths)
    )
    if (runtime_name, threads) != (settings.encoder_runtime, settings.torch_threads):
        update = {"encoder_runtime": runtime_name, "torch_threads": threads}
        ctx.settings = settings.model_copy(update=update)
    files = [Path(p) for p in paths]
    # Both before the storage, search and database modules import (about 0.25 s of one core):
    # the encoder loads and the first files decode meanwhile, on the other core. Neither
    # raises; errors surface where the runtime loads the encoder.
    preload_encoder(ctx.settings)
    prepared = early_preparation(ctx.settings, files)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        if as_json:
            echo_json(row)
        else:
            rows.append(row)

    try:
        from moderation.service.operations import screen_paths

        with initialised_runtime(ctx) as runtime:
            screen_paths(
                runtime,
                files,
                subject_id=subject_id,
                external_id_prefix=external_id_prefix,
                on_result=emit,
                prepared=prepared,
            )
    finally:
        if prepared is not None:
            prepared.pipeline.close()
    if not as_json:
        _print_screened(rows)


def _print_screened(rows: list[dict[str, Any]]) -> None:
    """``moderation screen``'s table: path, decision, score, first two matches or the reason,
    total ms."""
    table = [
        {
            "path": r["path"],
            "decision": r["decision"],
            "score": "" if r["score"] is None else f"{r['score']:.3f}",
            "match": ", ".join(f"{m['bank']}:{m['entry_id']}" for m in r["matches"][:2])
            or (r["reason"] or ""),
            "ms": f"{r['timings_ms']['total']:.0f}",
        }
        for r in rows
    ]
    print_table(table, ["path", "decision", "score", "match", "ms"])


# --- keys -----------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Master keys."""


@keys.command("rotate")
@click.option(
    "--retire-old/--keep-old",
    default=True,
    show_default=True,
    help="Remove the previous keys from the key file after re-wrapping.",
)
@pass_ctx
def keys_rotate(ctx: Context, retire_old: bool) -> None:
    """Make a new primary key and re-wrap every stored data key under it.

    With MODERATION_MASTER_KEYS set, no key is generated: put the new key first in the
    variable (keeping the old ones), run this to re-wrap, then drop the old keys.
    """
    from moderation.governance.keys import rotate_keys

    with initialised_runtime(ctx) as runtime:
        report = rotate_keys(runtime, retire_old=retire_old, actor="cli")
    echo_json(
        {"primary_key_id": report.primary, "retired": report.retired, "rewrapped": report.rewrapped}
    )


# --- benchmark and demo -----------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def protocol_options(classifier_help: str) -> Callable[[F], F]:
    """The quality protocol's options (``--references``, ``--per-edit``, ``--seed``,
    ``--classifier/--no-classifier``), shared by ``moderation benchmark`` and its
    ``encoders`` subcommand."""

    def decorate(command: F) -> F:
        for option in reversed(
            (
                click.option("--references", "n_references", default=250, show_default=True),
                click.option("--per-edit", "per_edit", default=20, show_default=True),
                click.option("--seed", default=0, show_default=True),
                click.option(
                    "--classifier/--no-classifier",
                    default=True,
                    show_default=True,
                    help=classifier_help,
                ),
            )
        ):
            command = option(command)
        return command

    return decorate


@main.group(invoke_without_command=True)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of photos: references and queries are drawn from it.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path))
@protocol_options("Also run the classifier stage (trains a model on the references: slower).")
@click.option(
    "--unseen-per-implementation",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Positives and negatives per unseen edit implementation, reported apart as "
    "'unseen implementations' (0: none).",
)
@click.pass_context
def benchmark(
    click_ctx: click.Context,
    images_dir: Path | None,
    json_out: Path | None,
    plot_out: Path | None,
    n_references: int,
    per_edit: int,
    seed: int,
    classifier: bool,
    unseen_per_implementation: int,
) -> None:
    """Detection quality per BENCHMARKS.md (PDQ baseline in the same run); subcommands measure
    other things."""
    if click_ctx.invoked_subcommand is not None:
        return
    if images_dir is None:
        raise click.UsageError("--images DIR is required (or name a subcommand)")
    from moderation.benchmark.runner import run_quality_benchmark

    ctx = click_ctx.find_object(Context)
    assert ctx is not None
    with config_errors():
        run_quality_benchmark(
            ctx.settings,
            images_dir,
            json_out=json_out,
            plot_out=plot_out,
            n_references=n_references,
            per_edit=per_edit,
            seed=seed,
            echo=click.echo,
            classifier=classifier,
            unseen_per_implementation=unseen_per_implementation,
        )


@main.command()
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Photos to use instead of scikit-image's: the first --bank-size are banned, the next "
    "--bank-size are the unrelated photos.",
)
@click.option("--bank-size", default=20, show_default=True, type=click.IntRange(min=1))
@pass_ctx
def demo(ctx: Context, images_dir: Path | None, bank_size: int) -> None:
    """Build a bank from scikit-image's photos (or --images), screen edited copies and unrelated
    photos, train the classifier, screen again; prints before/after figures and writes a PR
    plot and an HTML report (a demo artefact of sample photos)."""
    from moderation.cli.demo import run_demo

    with config_errors():
        try:
            run_demo(ctx.settings, echo=click.echo, images_dir=images_dir, bank_size=bank_size)
        except ValueError as exc:  # too few photos, or too few pairs to train the classifier
            raise click.ClickException(str(exc)) from exc
