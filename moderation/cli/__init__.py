"""The ``moderation`` command line (click), exactly as in ARCHITECTURE.md's CLI contract.

Commands live in modules of this package by area and register themselves on :func:`main`
(imported at the bottom of this file).

Exit codes: 0 success (whatever the screening decisions), 2 usage error (click), 3
configuration or integrity error (missing set-up, bad policy, unreadable snapshot, bad keys).
"""

# ruff: noqa: E402 - the cyclic collector pauses before the imports below
from __future__ import annotations

import atexit
import gc
import json
import logging
import sys

# Importing the commands creates a few hundred thousand objects that live until exit (modules,
# SQLAlchemy mappers, pydantic models); the cyclic collector scanning them meanwhile finds
# nothing to free. It pauses while this package imports; what exists then is frozen
# (``gc.freeze``: never scanned again) and the collector runs as usual after
# (:func:`_resume_collector`, at the bottom). README "Performance" has the figures.
_COLLECTOR_WAS_ENABLED = gc.isenabled()
gc.disable()
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from moderation import __version__
from moderation.config import ConfigurationError, Settings, load_settings

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT = 3


class Context:
    """Per-invocation state: settings, and the runtime built from them on demand."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runtime: Any = None

    @property
    def runtime(self) -> Any:
        """The :class:`moderation.service.runtime.Runtime` (imported lazily: torch is slow to
        import)."""
        if self._runtime is None:
            from moderation.service.runtime import Runtime

            self._runtime = Runtime(self.settings)
        return self._runtime


pass_ctx = click.make_pass_decorator(Context)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(CONFIG_ERROR_EXIT)


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn configuration and integrity errors into a one-line message and exit code 3."""
    from moderation.banks.records import BlocklistError
    from moderation.banks.snapshot import SnapshotError
    from moderation.crypto.errors import CryptoError

    try:
        yield
    except (ConfigurationError, SnapshotError, CryptoError) as exc:
        _fail(str(exc))
    except BlocklistError as exc:
        _fail(str(exc))


@contextmanager
def initialised_runtime(ctx: Context, *refused: type[Exception]) -> Iterator[Runtime]:
    """The runtime, once the deployment is checked as set up, for the command's body.

    Configuration and integrity errors, a missing ``init`` included, exit 3
    (:func:`config_errors`); the ``refused`` errors raised by the body (e.g. ``GdprError``)
    become a one-line CLI error (exit 1).
    """
    with config_errors():
        runtime = ctx.runtime
        runtime.check_initialised()
        try:
            yield runtime
        except refused as exc:
            raise click.ClickException(str(exc)) from None


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, default=str))


@click.group()
@click.version_option(__version__, prog_name="moderation")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Screen images against encrypted near-duplicate blocklists."""
    atexit.unregister(_skip_exit_collection)  # once, however often main runs in a process
    atexit.register(_skip_exit_collection)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        _fail(str(exc))
    # Our own loggers at the configured level; third-party chatter (faiss's loader, alembic's
    # plugins) only from WARNING up.
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("moderation").setLevel(settings.log_level)
    ctx.obj = Context(settings)


def _resume_collector() -> None:
    """End the import-time pause of the cyclic collector (see the top of this module)."""
    gc.freeze()
    if _COLLECTOR_WAS_ENABLED:
        gc.enable()


def _skip_exit_collection() -> None:
    """At exit, skip the full collection over everything the command built (about 0.1 s; the
    process's memory goes back whole): registered once per command run."""
    gc.disable()
    gc.freeze()


# --- helpers --------------------------------------------------------------------------------


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def echo_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    """A listing: one JSON object per row (``--json``), else a table of ``columns``."""
    if as_json:
        for row in rows:
            echo_json(row)
    else:
        print_table(rows, list(columns))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console(width=160).print(table)


# Command modules register on `main` when imported.
from moderation.cli import (  # noqa: F401
    api_clients,
    audit,
    bank_admin,
    canary,
    classifier,
    core,
    decisions,
    encoder,
    hashes,
    holds,
    ops,
    quarantine,
    review,
    service,
    tenancy,
    users,
)

_resume_collector()
