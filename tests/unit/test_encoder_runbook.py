"""docs/runbooks/encoder-rollback.md: every command of its ``console`` blocks runs (exit 0) on a
deployment whose promoted encoder must be rolled back, and the rollback takes effect."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import Cli, skimage_photo
from tests.tiny_clip import relaxed_slo_policies, tiny_clip_encoder

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbooks" / "encoder-rollback.md"


def console_commands(text: str) -> list[list[str]]:
    """The ``$ moderation ...`` lines of the runbook's ``console`` blocks, as argument lists."""
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    return [
        shlex.split(line[2:])
        for block in blocks
        for line in block.splitlines()
        if line.startswith("$ ")
    ]


def test_every_runbook_command_runs_and_rolls_back(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tiny_clip_encoder(tmp_path / "clip", monkeypatch)
    # The canary gate runs on promotion; these SLOs let the tiny random encoder through.
    monkeypatch.setenv("MODERATION_POLICIES_DIR", str(relaxed_slo_policies(tmp_path / "pol")))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        skimage_photo(name).convert("RGB").save(photos / f"{name}.jpg", quality=90)
    cli("init")
    cli("bank", "create", "kept", "--retain-originals")
    cli("bank", "import", "kept", str(photos))
    cli("encoder", "migrate", target, "--wait")
    assert cli.json_lines("encoder", "promote")[-1]["serving"] == target

    commands = console_commands(RUNBOOK.read_text())
    assert [c[:3] for c in commands] == [
        ["moderation", "encoder", "status"],
        ["moderation", "encoder", "rollback"],
        ["moderation", "encoder", "status"],
    ]
    outputs = [cli(*command[1:]).stdout for command in commands]
    status = json.loads(outputs[-1].strip().splitlines()[-1])
    assert status["migration"]["state"] == "rolled_back"
    assert status["serving"] != target and status["shadow"] is None
