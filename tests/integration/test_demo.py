"""``moderation demo`` end to end: the README's first command must keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.cli.demo import run_demo
from moderation.config import load_settings


@pytest.mark.slow
def test_demo_flags_copies_and_allows_unrelated_photos(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = run_demo(load_settings(data_dir=tmp_path / "var"), echo=lines.append)
    assert summary["copies"] >= 15
    assert summary["flagged"] >= 0.8 * summary["copies"]
    assert summary["allowed"] == summary["unrelated"]
    assert (tmp_path / "var" / "demo" / "var" / "moderation.db").exists()
    assert any("originals not kept" in line for line in lines)
