"""The benchmark's "unseen implementations" split: queries, figures apart, printed and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation.benchmark import build_protocol, run_protocol
from moderation.benchmark.protocol import UNEDITED, Protocol
from moderation.benchmark.runner import _write_outputs
from moderation.benchmark.unseen import TARGETS, markdown, split_results, summary
from moderation.media.implementations import IMPLEMENTATIONS, UNSEEN

NAMES = ("screenshot.story_viewer", "paste.collage", "emoji.big", "rotate.albu_reflect")


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Thirty distinct smooth colour fields, 96 x 72 px."""
    directory = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(30):
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        path = directory / f"p{i:02d}.png"
        Image.fromarray(coarse).resize((96, 72), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def protocol_of(paths: Sequence[Path], unseen: Sequence[str] = NAMES) -> Protocol:
    return build_protocol(
        paths,
        n_references=12,
        positives_per_edit=2,
        negatives_per_edit=2,
        unedited_negatives=4,
        edits=("jpeg_q15", "hflip"),
        unseen=unseen,
        unseen_per_implementation=3,
        seed=4,
    )


def test_unseen_queries_are_added_without_changing_the_others(image_paths: list[Path]) -> None:
    with_unseen = protocol_of(image_paths)
    without = protocol_of(image_paths, unseen=())
    again = protocol_of(image_paths)

    unseen = [q for q in with_unseen.queries if q.query_id.startswith("unseen/")]
    others = [q for q in with_unseen.queries if not q.query_id.startswith("unseen/")]
    assert [(q.query_id, q.image.tobytes()) for q in others] == [
        (q.query_id, q.image.tobytes()) for q in without.queries
    ]
    assert [q.image.tobytes() for q in with_unseen.queries] == [
        q.image.tobytes() for q in again.queries
    ], "deterministic"
    assert len(unseen) == len(NAMES) * 6
    for name in NAMES:
        mine = [q for q in unseen if q.edit == name]
        assert [q.query_id for q in mine] == [f"unseen/{name}/pos/{i}" for i in range(3)] + [
            f"unseen/{name}/neg/{i}" for i in range(3)
        ]
        assert {q.family for q in mine} == {IMPLEMENTATIONS[name].family}
        assert sum(q.true_ref_id is not None for q in mine) == 3
        pastes = IMPLEMENTATIONS[name].needs_background
        assert all((q.background is not None) == pastes for q in mine)
        assert all(q.background != q.source for q in mine)


def test_unknown_implementation_is_refused(image_paths: list[Path]) -> None:
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        protocol_of(image_paths, unseen=("nope",))


class Thumbnail:
    """Nearest reference by 8 x 8 thumbnail; decides block/review/allow by its cosine."""

    def __init__(self, name: str = "thumb") -> None:
        self.name = name
        self.ids: list[str] = []
        self.matrix = np.zeros((0, 192))

    @staticmethod
    def vector(image: Image.Image) -> np.ndarray:
        v = np.asarray(image.convert("RGB").resize((8, 8)), np.float64).ravel()
        v -= v.mean()
        return v / (np.linalg.norm(v) + 1e-9)

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        self.ids = [r for r, _ in references]
        self.matrix = np.stack([self.vector(img) for _, img in references])

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        out: list[tuple[str | None, float, str | None]] = []
        for image in images:
            scores = self.matrix @ self.vector(image)
            best = int(scores.argmax())
            score = float(scores[best])
            decision = "block" if score > 0.97 else "review" if score > 0.9 else "allow"
            out.append((self.ids[best], score, decision))
        return out


def test_split_results_report_unseen_apart(image_paths: list[Path], tmp_path: Path) -> None:
    protocol = protocol_of(image_paths)
    everything = run_protocol(protocol, [Thumbnail()])
    own, unseen = split_results(everything)
    baseline = run_protocol(protocol_of(image_paths, unseen=()), [Thumbnail()])

    assert [p.query_id for p in own[0].predictions] == [p.query_id for p in baseline[0].predictions]
    assert own[0].micro_ap == pytest.approx(baseline[0].micro_ap)
    assert own[0].images_per_second == pytest.approx(everything[0].images_per_second)
    edits = {p.edit for p in unseen[0].predictions}
    assert edits == {*NAMES, UNEDITED}
    assert set(unseen[0].per_edit_recall) == set(NAMES)

    row = summary(unseen[0])
    negatives = [p for p in unseen[0].predictions if p.true_ref_id is None]
    assert row["n_negatives"] == len(negatives) == len(NAMES) * 3 + 4
    assert row["unrelated_blocked"] == sum(p.decision == "block" for p in negatives)
    assert set(row["family_flagged"]) == {IMPLEMENTATIONS[n].family for n in NAMES}
    assert row["targets_met"]["micro_ap"] == (row["micro_ap"] >= TARGETS["micro_ap"])

    printed = markdown(unseen)
    assert printed.startswith("Unseen implementations")
    assert (
        "| Method | µAP | R@P99 | Unrelated blocked | Negatives to review | Targets met |"
        in printed
    )
    for name in NAMES:
        assert f"| {name} |" in printed and f"| {IMPLEMENTATIONS[name].family} |" in printed

    out = tmp_path / "report.json"
    _write_outputs(own, unseen, protocol, {}, out, None, lambda _: None)
    document = json.loads(out.read_text())
    section = document["unseen_implementations"]
    assert section["implementations"] == sorted(NAMES)
    assert section["methods"][0]["name"] == "thumb"
    assert section["methods"][0]["micro_ap"] == pytest.approx(unseen[0].micro_ap)
    assert len(section["methods"][0]["predictions"]) == len(unseen[0].predictions)
    assert all(
        not p["query_id"].startswith("unseen/") for p in document["methods"][0]["predictions"]
    )


def test_without_unseen_queries_nothing_is_split(image_paths: list[Path]) -> None:
    results = run_protocol(protocol_of(image_paths, unseen=()), [Thumbnail()])
    own, unseen = split_results(results)
    assert unseen == [] and own == results


def test_default_unseen_set_is_the_registry_split() -> None:
    assert len(UNSEEN) >= 20 and all(IMPLEMENTATIONS[n].split == "unseen" for n in UNSEEN)
