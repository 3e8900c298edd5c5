"""Hash-list commands: ``bank import-hashes`` and ``bank export-hashes``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from moderation.cli import Context, echo_json, initialised_runtime, pass_ctx, stderr_console
from moderation.cli.core import bank

#: Formats ``bank import-hashes`` reads (``moderation.banks.hashlists.FORMATS``), kept here as
#: literals so ``--help`` does not import the library.
IMPORT_FORMATS = (
    "auto",
    "threatexchange",
    "te-csv",
    "pdq",
    "md5",
    "sha1",
    "sha256",
    "ncmec",
    "stopncii",
)
EXPORT_FORMATS = ("threatexchange", "te-csv", "pdq", "md5", "sha1", "sha256")
#: Exit status when the file was refused (malformed lines): nothing was imported.
REFUSED_EXIT = 1


@bank.command("import-hashes")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(IMPORT_FORMATS),
    default="auto",
    show_default=True,
    help="threatexchange: `signal_type value` per line (python-threatexchange local_file); "
    "te-csv: `threatexchange dataset -P --csv`; pdq/md5/sha1/sha256: one hex value per line; "
    "ncmec: NCMEC entries (XML or JSON lines); stopncii: StopNCII hash records (JSON).",
)
@pass_ctx
def bank_import_hashes(ctx: Context, name: str, file: Path, fmt: str) -> None:
    """Import the hash list FILE into bank NAME as one new snapshot version.

    A malformed line refuses the whole file (every line and reason printed, exit 1); PDQ of
    quality below 50 and unsupported signal types are skipped and reported.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from moderation.banks.hash_import import HashListError, import_hash_list

    with (
        initialised_runtime(ctx) as runtime,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}: {task.completed:,} lines"),
            TimeElapsedColumn(),
            console=stderr_console(),
        ) as bar,
    ):
        task = bar.add_task(f"reading {file.name}", total=None)
        try:
            report = import_hash_list(
                runtime,
                name,
                file,
                fmt=fmt,
                actor="cli",
                progress=lambda lines: bar.update(task, completed=lines),
            )
        except HashListError as exc:
            for problem in exc.errors:
                click.echo(f"{file.name}:{problem.line}: {problem.reason}", err=True)
            click.echo(f"error: {len(exc.errors)} malformed line(s): nothing imported", err=True)
            sys.exit(REFUSED_EXIT)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    for problem in report.skipped:
        click.echo(f"skipped {file.name}:{problem.line}: {problem.reason}", err=True)
    echo_json(report.to_json())


@bank.command("export-hashes")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="threatexchange")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (mode 0600) instead of standard output.",
)
@pass_ctx
def bank_export_hashes(ctx: Context, name: str, fmt: str, out: Path | None) -> None:
    """Write bank NAME's PDQ digests (and the exact hashes it was given) as a hash list that
    another HMA or ThreatExchange deployment can import. Audited: the file is a plaintext list."""
    from moderation.banks.hash_export import export_hashes

    with initialised_runtime(ctx) as runtime:
        if out is None:
            count = export_hashes(runtime, name, sys.stdout, fmt=fmt, actor="cli")
        else:
            out.touch(mode=0o600)
            with out.open("w", encoding="utf-8") as handle:
                count = export_hashes(runtime, name, handle, fmt=fmt, actor="cli")
    click.echo(f"exported {count} record(s) from {name} ({fmt})", err=True)
