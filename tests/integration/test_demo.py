"""``moderation demo`` end to end: the README's first command must keep working."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import select

from moderation.cli.demo import run_demo
from moderation.config import load_settings


class _ReportParser(HTMLParser):
    """Collects the report's item rows: per ``<tr class="item">`` its images and badge text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, list[str]]] = []
        self._in_badge = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and values.get("class") == "item":
            self.rows.append({"images": [], "decisions": []})
        elif self.rows and tag == "img":
            self.rows[-1]["images"].append(values.get("src") or "")
        self._in_badge = tag == "span" and values.get("class") == "badge"

    def handle_data(self, data: str) -> None:
        if self._in_badge and self.rows:
            self.rows[-1]["decisions"].append(data)
            self._in_badge = False


@pytest.mark.slow
def test_demo_trains_the_classifier_and_writes_its_report(tmp_path: Path) -> None:
    from moderation.storage.db import create_db_engine
    from moderation.storage.models import ClassifierModel

    lines: list[str] = []
    summary = run_demo(load_settings(data_dir=tmp_path / "var"), echo=lines.append)
    assert summary["copies"] >= 25
    assert summary["flagged"] >= 0.8 * summary["copies"]
    assert summary["allowed"] == summary["unrelated"]
    database = tmp_path / "var" / "demo" / "var" / "moderation.db"
    assert database.exists()
    assert any("originals not kept" in line for line in lines)

    # The classifier was trained (classifier train's code path) and stored in the database.
    assert summary["classifier_activated"]
    with create_db_engine(f"sqlite:///{database}").connect() as connection:
        versions = connection.execute(select(ClassifierModel.version)).scalars().all()
    assert versions == [summary["classifier_version"]]
    assert any(line.startswith(f"classifier {summary['classifier_version']}") for line in lines)
    # Before/after figures: printed (the rich tables go to stdout) and returned.
    for phase in ("before", "after"):
        figures = summary[phase]
        assert 0.0 <= figures["micro_ap"] <= 1.0
        assert sum(figures["copies"].values()) == summary["copies"]
        assert sum(figures["unrelated"].values()) == summary["unrelated"]
        assert figures["families"]["screenshot"][1] == 5
        assert figures["families"]["overlay_bg_60"][1] == 5
    caught = [line for line in lines if line.startswith("caught ")]
    assert len(caught) == 2
    assert "of 5 screenshot copies (before training: " in caught[0]
    assert any(line.startswith("after training: edited copies flagged") for line in lines)

    plot, report = Path(summary["plot"]), Path(summary["report"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(str(plot) in line for line in lines)
    assert any(str(report) in line for line in lines)
    text = report.read_text(encoding="utf-8")
    parser = _ReportParser()
    parser.feed(text)
    parser.close()
    # One row per screened item, each with its decisions (after, before training) and its query
    # thumbnail; every copy is matched to its bank photo (a second thumbnail).
    assert len(parser.rows) == summary["items"]
    for row in parser.rows[: summary["copies"]]:
        assert len(row["decisions"]) == 2
        assert set(row["decisions"]) <= {"block", "review", "allow"}
        assert len(row["images"]) == 2
        assert all(src.startswith("data:image/jpeg;base64,") for src in row["images"])
    assert sum(r["decisions"] == ["unscannable"] * 2 for r in parser.rows) == 1
    assert "Demo artefact" in text
    assert "data:image/png;base64," in text
    assert f"{summary['after']['micro_ap']:.3f}" in text
