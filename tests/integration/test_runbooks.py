"""Every command a runbook in docs/runbooks/ names runs, and exits 0 (docs/runbooks/README.md
gives the convention).

The commands of ```console blocks (lines starting ``$ ``) and ```bash blocks (every line that is
not a comment) of every runbook run in the runbook's order, one test id each, against one
prepared deployment per runbook: ``moderation init``, a block bank of three photos with one
quarantine-free entry, an upload of a data subject with a registered erasure request, an API
client, and a live worker heartbeat (a real :class:`WorkerState`, refreshed before each
command). Placeholders (``<BANK>``...) are replaced by that deployment's values; an unknown
placeholder, a command that is not ``moderation ...`` and an unknown subcommand fail the test.
``moderation worker|serve|beat`` run until stopped, so only their arguments are checked.
A runbook whose commands only mean something in a particular state gets that state too
(:data:`PREPARATIONS`: encoder-rollback.md runs on a deployment whose promoted encoder
migration is to be rolled back).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from sqlalchemy import update

from moderation.cli import main
from moderation.config import load_settings
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.models import ErasureRequest
from tests.conftest import Cli, skimage_photo
from tests.tiny_clip import register_tiny_clip, relaxed_slo_policies, tiny_clip_encoder

RUNBOOKS = Path(__file__).resolve().parents[2] / "docs" / "runbooks"
LONG_RUNNING = {"worker", "serve", "beat"}
PHOTOS = ("astronaut", "coffee", "rocket")
SUBJECT = "runbook.subject-4711@example.com"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")
_PLACEHOLDER = re.compile(r"<([A-Z_]+)>")


def runbook_commands(path: Path) -> list[str]:
    """The commands of ``path``'s ```console (``$ `` lines, ``\\`` continuations joined) and
    ```bash (non-comment lines) blocks, in order."""
    commands: list[str] = []
    for language, body in _FENCE.findall(path.read_text(encoding="utf-8")):
        if language not in ("console", "bash"):
            continue
        pending = ""
        for raw in body.splitlines():
            line = raw.strip()
            if pending:
                line = pending + " " + line
                pending = ""
            elif language == "console":
                if not line.startswith("$ "):
                    continue  # output shown in the runbook
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending = line[:-1].strip()
                continue
            commands.append(line)
    return commands


def _params() -> list[object]:
    params: list[object] = []
    for path in sorted(RUNBOOKS.glob("*.md")):
        for index, command in enumerate(runbook_commands(path)):
            params.append(pytest.param(path.name, command, id=f"{path.stem}:{index}:{command}"))
    return params


@dataclass
class Deployment:
    """A prepared data dir, the values of the placeholders, and a live worker heartbeat."""

    data_dir: Path
    values: dict[str, str]
    worker: WorkerState | None = None
    # Re-applied before each of the runbook's commands (a test's monkeypatches end with it).
    setup: list[Callable[[pytest.MonkeyPatch], None]] = field(default_factory=list)

    def heartbeat(self) -> None:
        """A real worker's refresh: reload a new snapshot (with the current keys) and report."""
        if self.worker is None:
            runtime = Runtime(load_settings(data_dir=self.data_dir))
            self.worker = WorkerState(runtime, poll_interval=60)
        else:
            self.worker.runtime.reload_keyring()
        self.worker.refresh()
        assert self.worker.error is None, self.worker.error


def prepare(base: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """``moderation init``, bank ``known`` of three photos, subject SUBJECT's screened upload
    and erasure request, API client ``acme``."""
    cli = Cli(base / "var", monkeypatch)
    images = base / "images"
    images.mkdir()
    for name in PHOTOS:
        skimage_photo(name).save(images / f"{name}.jpg", quality=92)
    cli("init")
    cli("bank", "create", "known")
    cli("bank", "import", "known", str(images))
    entry = cli.json_lines("bank", "entries", "known", "--json")[0]
    cli("screen", "--subject-id", SUBJECT, str(images / "coffee.jpg"))
    cli("gdpr", "request", SUBJECT)
    cli("api-client", "create", "acme")
    values = {
        "BANK": "known",
        "ENTRY": str(entry.get("entry_id") or entry.get("id")),
        "IMAGE": str(images / "astronaut.jpg"),
        "IMAGES": str(images),
        "SUBJECT": SUBJECT,
        "CLIENT": "acme",
        "SCRATCH": str(base / "scratch"),
    }
    return Deployment(base / "var", values)


def _promoted_migration(
    base: Path, deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encoder-rollback.md's state: bank ``kept`` retains its originals, an encoder migration
    to a second (tiny, offline) encoder ran and was promoted: the serving encoder to roll back."""
    clip_dir, policies = base / "clip", relaxed_slo_policies(base / "policies")

    def setup(mp: pytest.MonkeyPatch) -> None:
        register_tiny_clip(clip_dir, mp)
        # The canary gate runs on promotion; these SLOs let the tiny random encoder through.
        mp.setenv("MODERATION_POLICIES_DIR", str(policies))

    target = tiny_clip_encoder(clip_dir, monkeypatch)
    deployment.setup.append(setup)
    cli = Cli(deployment.data_dir, monkeypatch)  # clears MODERATION_*: set up after it
    setup(monkeypatch)
    cli("bank", "create", "kept", "--retain-originals")
    cli("bank", "import", "kept", deployment.values["IMAGES"])
    cli("encoder", "migrate", target, "--wait")
    assert cli.json_lines("encoder", "promote")[-1]["serving"] == target


PREPARATIONS: dict[str, Callable[[Path, Deployment, pytest.MonkeyPatch], None]] = {
    "encoder-rollback.md": _promoted_migration,
}
"""Runbooks whose commands need more than :func:`prepare`'s deployment, and what they need."""


@pytest.fixture(scope="module")
def deployments() -> Iterator[dict[str, Deployment]]:
    found: dict[str, Deployment] = {}
    yield found
    for deployment in found.values():
        if deployment.worker is not None:
            deployment.worker.runtime.engine.dispose()


def substitute(command: str, values: dict[str, str]) -> str:
    unknown = set(_PLACEHOLDER.findall(command)) - set(values)
    assert not unknown, f"unknown placeholders {unknown} (docs/runbooks/README.md lists them)"
    return _PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), command)


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, the ``moderation`` arguments)."""
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and (match := _ASSIGNMENT.match(words[0])):
        env[match.group(1)] = match.group(2)
        words.pop(0)
    assert words and words[0] == "moderation", (
        f"{command!r}: console/bash blocks hold `moderation ...` commands only; put the host's "
        "shell steps in ```sh blocks (docs/runbooks/README.md)"
    )
    return env, words[1:]


def check_arguments(args: list[str]) -> None:
    """Parse ``args`` as click would, without running the command (fails on unknown
    subcommands and options)."""
    with main.make_context("moderation", list(args), resilient_parsing=False) as ctx:
        name, command, rest = main.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert command is not None, f"unknown command {name}"
        command.make_context(str(name), rest, parent=ctx).close()


@pytest.mark.parametrize(("runbook", "command"), _params())
def test_runbook_command_exits_0(
    runbook: str,
    command: str,
    deployments: dict[str, Deployment],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if runbook not in deployments:
        base = tmp_path_factory.mktemp(Path(runbook).stem)
        deployments[runbook] = prepare(base, monkeypatch)
        if runbook in PREPARATIONS:
            PREPARATIONS[runbook](base, deployments[runbook], monkeypatch)
    deployment = deployments[runbook]
    env, args = split(substitute(command, deployment.values))
    cli = Cli(deployment.data_dir, monkeypatch)
    for setup in deployment.setup:
        setup(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if args and args[0] in LONG_RUNNING:
        try:
            check_arguments(args)
        except click.UsageError as exc:
            pytest.fail(f"{command!r}: {exc}")
        return
    deployment.heartbeat()
    result = cli(*args, ok=False)
    assert result.exit_code == 0, (command, result.output, result.stderr)


def test_every_runbook_has_commands_and_a_verification() -> None:
    runbooks = [p for p in RUNBOOKS.glob("*.md") if p.name != "README.md"]
    assert len(runbooks) >= 5
    for path in runbooks:
        text = path.read_text(encoding="utf-8")
        assert runbook_commands(path), path.name
        assert "## Verify" in text, f"{path.name} says how to verify recovery"


def test_the_harness_fails_loudly() -> None:
    with pytest.raises(click.UsageError):
        check_arguments(["encoder-typo", "promote"])
    with pytest.raises(AssertionError, match="unknown placeholders"):
        substitute("moderation bank entries <BNAK>", {"BANK": "known"})
    with pytest.raises(AssertionError, match="commands only"):
        split("docker compose restart worker")


# --- the Verify sections detect the incident and its end -------------------------------------


def test_status_check_detects_a_damaged_snapshot_until_the_backup_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = prepare(tmp_path, monkeypatch)
    deployment.heartbeat()
    cli = Cli(deployment.data_dir, monkeypatch)
    snapshot = cli.json_lines("status", "--json")[0]["snapshot"]
    path = deployment.data_dir / "snapshots" / snapshot["file"]
    backup = path.read_bytes()
    damaged = bytearray(backup)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    failed = cli("status", "--check", "--json", ok=False)
    assert failed.exit_code == 1
    report = json.loads(failed.stdout)
    assert not report["snapshot"]["verified"] and snapshot["file"] in report["snapshot"]["error"]
    assert any(p.startswith("snapshot:") for p in report["problems"])
    assert report["unscannable_by_reason"] == {}
    path.write_bytes(backup)  # the runbook's restore from the data volume's backup
    assert cli("status", "--check").exit_code == 0


def test_status_check_reports_an_overdue_erasure_until_it_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = prepare(tmp_path, monkeypatch)
    deployment.heartbeat()
    cli = Cli(deployment.data_dir, monkeypatch)
    assert deployment.worker is not None
    with transaction(deployment.worker.runtime.sessions) as session:
        session.execute(
            update(ErasureRequest).values(received_at=datetime.now(UTC) - timedelta(days=26))
        )
    failed = cli("status", "--check", ok=False)
    assert failed.exit_code == 1 and "1 erasure requests are overdue" in failed.stderr
    assert cli.json_lines("gdpr", "requests", "--overdue", "--json")
    cli("gdpr", "erase", SUBJECT, "--yes")
    assert not cli.json_lines("gdpr", "requests", "--overdue", "--json")
    assert cli("status", "--check").exit_code == 0
