"""The demo's figures and HTML report on hand-made screening results (no encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from moderation.banks.records import EntryInfo
from moderation.benchmark.demo_figures import (
    DemoItem,
    method_result,
    pdq_predictions,
    phase_figures,
    predictions,
)
from moderation.benchmark.demo_report import item_row, signals_agreed, thumbnail_uri
from moderation.matching.decision import MatchResult, ScreeningResult
from tests.screening_results import screening_result


def _result(decision: str, candidates: list[dict[str, Any]]) -> ScreeningResult:
    return screening_result(decision, explanation={"candidates": candidates})


def _candidate(entry: str, cosine: float, pdq: int | None) -> dict[str, Any]:
    return {"entry_id": entry, "cosine": cosine, "pdq_distance": pdq, "probability": None}


def _items(tmp_path: Path) -> list[DemoItem]:
    return [
        DemoItem(
            tmp_path / "a--x.jpg", "copy", "x", "a", _result("block", [_candidate("e_1", 0.9, 4)])
        ),
        DemoItem(
            tmp_path / "b--x.jpg",
            "copy",
            "x",
            "b",
            _result("allow", [_candidate("e_1", 0.5, None)]),
        ),
        DemoItem(
            tmp_path / "u.jpg",
            "unrelated",
            "none",
            None,
            _result("allow", [_candidate("e_2", 0.6, 90)]),
        ),
        DemoItem(tmp_path / "broken.jpg", "broken", "truncated", None, _result("unscannable", [])),
    ]


def test_figures_count_copies_per_family_and_rank_by_score(tmp_path: Path) -> None:
    names = {"e_1": "a", "e_2": "b"}
    items = _items(tmp_path)
    preds = predictions(items, names)
    assert [p.query_id for p in preds] == ["a--x.jpg", "b--x.jpg", "u.jpg"]  # broken left out
    result = method_result("after", preds)
    # Ranked: a (0.9, correct), u (0.6, wrong), b (0.5 -> "a", wrong): µAP = 1/1 / 2 positives.
    assert result.micro_ap == 0.5
    figures = phase_figures(items, result)
    assert figures.families == {"x": (1, 2)}
    assert figures.copies == {"block": 1, "allow": 1}
    assert figures.unrelated == {"allow": 1}
    pdq = pdq_predictions(items, names)
    assert [(p.ref_id, p.score) for p in pdq] == [
        ("a", 1 - 4 / 256),
        (None, 0.0),
        ("b", 1 - 90 / 256),
    ]


def test_row_escapes_names_and_embeds_a_thumbnail(tmp_path: Path) -> None:
    query = tmp_path / "<script>x.jpg"
    Image.new("RGB", (400, 200), "red").save(query, "JPEG")
    bank = tmp_path / "a.png"
    Image.new("RGB", (50, 50), "blue").save(bank)
    item = DemoItem(query, "copy", "x", "a", _result("review", [_candidate("e_1", 0.8, 0)]))
    row = item_row(item, {"e_1": "a"}, {"a": bank}, before="allow")
    assert "<script>" not in row
    assert "&lt;script&gt;" in row
    assert row.count('src="data:image/jpeg;base64,') == 2
    assert ">review</span>" in row and ">allow</span>" in row
    assert "<td>0</td>" in row  # PDQ distance 0 is shown, not blank
    uri = thumbnail_uri(query)
    assert uri is not None and len(uri) < 10_000


def test_undecodable_file_has_no_thumbnail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert thumbnail_uri(broken) is None


def _match(
    signals: tuple[str, ...], *, probability: float | None = None, inliers: int | None = None
) -> MatchResult:
    entry = EntryInfo(1, 1, "known-bad", "blocklist", "csam", "a")
    evidence: dict[str, Any] = {
        "decided_by": "classifier",
        "passed": {"cosine": "review", "pdq": "none", "probability": "block"},
        "thresholds": {"cosine": 0.7, "pdq": None, "probability": 0.9},
    }
    if inliers is not None:
        evidence["local_inliers"] = inliers
    return MatchResult(entry, "block", 0.7, 12, probability, 0, signals, evidence=evidence)


def test_signals_agreed_reads_the_public_explanation() -> None:
    match = _match(("global_cosine", "query_region", "pdq", "classifier"), probability=0.97)
    agreed = signals_agreed(match.to_json()["signals"])
    assert agreed == {
        "exact hash": False,
        "PDQ": True,
        "embedding": True,
        "classifier": True,
        "region match": True,
        "local features": False,
    }
    pasted = _match(("local_features", "classifier"), probability=0.97, inliers=23).to_json()
    assert pasted["signals"]["local_features"] == {"inliers": 23, "agreed": True}
    assert signals_agreed(pasted["signals"])["local features"]
    few = _match(("classifier",), probability=0.5, inliers=3).to_json()["signals"]
    assert few["local_features"] == {"inliers": 3, "agreed": False}
    assert signals_agreed(_match(("exact_sha256",)).to_json()["signals"])["exact hash"]
    assert not any(signals_agreed({}).values())


def test_row_names_the_stage_that_decided(tmp_path: Path) -> None:
    query = tmp_path / "q.jpg"
    Image.new("RGB", (64, 64), "red").save(query, "JPEG")
    match = _match(("global_cosine", "classifier"), probability=0.97)
    result = screening_result(
        "block",
        matches=(match,),
        explanation={"candidates": [_candidate("e_1", 0.7, 12)]},
    )
    row = item_row(DemoItem(query, "copy", "x", "a", result), {"e_1": "a"}, {})
    assert match.to_json()["decided_by"] == "classifier"
    assert "<td>classifier</td>" in row
    assert row.count('class="yes"') == 2  # embedding and classifier


def test_demo_photos_from_a_folder_bank_first_then_unrelated(tmp_path: Path) -> None:
    from moderation.cli.demo import demo_photos

    for name in ("c", "a", "b", "d"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.jpg")
    (tmp_path / "notes.txt").write_text("not a photo")
    banned, unrelated = demo_photos(tmp_path, bank_size=1)
    assert [n for n, _ in banned] == ["a"]
    assert [n for n, _ in unrelated] == ["b"]
    with pytest.raises(ValueError, match="holds 4 images; the demo needs 5"):
        demo_photos(tmp_path, bank_size=4)
