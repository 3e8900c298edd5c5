"""The benchmark protocol (split, queries, seeds), the runner and the reports, end to end."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation.benchmark import (
    EDITS,
    UNEDITED,
    MethodResult,
    Protocol,
    build_protocol,
    markdown_table,
    plot_pr_curves,
    run_protocol,
    to_json,
)
from moderation.benchmark.protocol import query_seed
from moderation.media.edits import apply_edit
from tests.conftest import SKIMAGE_PHOTOS, skimage_photo_path


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Forty small distinct images: smooth random colour fields, 64 x 48 px."""
    directory = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((64, 48), Image.Resampling.BICUBIC)
        path = directory / f"img{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def small_protocol(paths: Sequence[Path], **kwargs: object) -> Protocol:
    options: dict[str, object] = {
        "n_references": 20,
        "positives_per_edit": 3,
        "negatives_per_edit": 4,
        "unedited_negatives": 5,
    }
    options.update(kwargs)
    return build_protocol(paths, **options)  # type: ignore[arg-type]


def describe(protocol: Protocol) -> list[tuple[object, ...]]:
    return [
        (q.query_id, q.edit, q.true_ref_id, q.source, q.seed, q.background, q.image.tobytes())
        for q in protocol.queries
    ]


def test_split_is_disjoint_deterministic_and_order_free(image_paths: list[Path]) -> None:
    protocol = small_protocol(image_paths, seed=7)
    references = {ref_id for ref_id, _ in protocol.references}
    all_ids = {p.stem for p in image_paths}
    assert len(references) == 20 and references <= all_ids
    for q in protocol.queries:
        if q.true_ref_id is not None:
            assert q.source == q.true_ref_id and q.true_ref_id in references
        else:
            assert q.source in all_ids - references, "negatives come from non-members"

    again = small_protocol(list(reversed(image_paths)), seed=7)
    assert again.references == protocol.references
    assert describe(again) == describe(protocol)

    other = small_protocol(image_paths, seed=8)
    assert {r for r, _ in other.references} != references


def test_counts_and_distinct_sources(image_paths: list[Path]) -> None:
    protocol = small_protocol(image_paths)
    kinds = Counter((q.edit, q.true_ref_id is not None) for q in protocol.queries)
    for edit in EDITS:
        assert kinds[(edit, True)] == 3 and kinds[(edit, False)] == 4
    assert kinds[(UNEDITED, False)] == 5 and kinds[(UNEDITED, True)] == 0
    assert len(protocol.queries) == len(EDITS) * 7 + 5
    assert len({q.query_id for q in protocol.queries}) == len(protocol.queries)
    for edit in [*EDITS, UNEDITED]:
        for positive in (True, False):
            sources = [
                q.source
                for q in protocol.queries
                if q.edit == edit and (q.true_ref_id is not None) == positive
            ]
            assert len(sources) == len(set(sources)), (edit, positive)


def test_query_images_and_seeds(image_paths: list[Path]) -> None:
    protocol = small_protocol(image_paths, seed=3)
    paths = {p.stem: p for p in image_paths}

    def load(image_id: str) -> Image.Image:
        with Image.open(paths[image_id]) as image:
            return image.convert("RGB")

    seeds = [q.seed for q in protocol.queries if q.edit != UNEDITED]
    assert len(set(seeds)) == len(seeds)
    assert 3 not in seeds, "query seeds are derived, not the protocol seed itself"
    for edit in EDITS:
        queries = [q for q in protocol.queries if q.edit == edit]
        assert [q.seed for q in queries] == [query_seed(3, edit, i) for i in range(7)]
        for q in (queries[0], queries[-1]):  # a positive and a negative
            assert q.seed is not None
            background = load(q.background) if q.background is not None else None
            expected = apply_edit(edit, load(q.source), seed=q.seed, background=background)
            assert q.image.mode == "RGB"
            assert q.image.tobytes() == expected.tobytes(), q.query_id
    for q in protocol.queries:
        if q.edit == UNEDITED:
            assert q.seed is None and q.image.tobytes() == load(q.source).tobytes()


def test_overlay_background_is_another_non_member(image_paths: list[Path]) -> None:
    # Two non-members only: each negative overlay must take the other one as background.
    for seed in range(5):
        protocol = build_protocol(
            image_paths[:22],
            n_references=20,
            positives_per_edit=4,
            negatives_per_edit=2,
            unedited_negatives=0,
            edits=["overlay_bg_60", "hflip"],
            seed=seed,
        )
        references = {ref_id for ref_id, _ in protocol.references}
        overlays = [q for q in protocol.queries if q.edit == "overlay_bg_60"]
        assert len(overlays) == 6
        for q in overlays:
            assert q.background is not None
            assert q.background != q.source and q.background not in references
        assert all(q.background is None for q in protocol.queries if q.edit == "hflip")


def test_each_path_is_loaded_once(image_paths: list[Path]) -> None:
    loads: Counter[Path] = Counter()

    def load(path: Path) -> Image.Image:
        loads[path] += 1
        with Image.open(path) as image:
            return image.convert("RGB")

    small_protocol(image_paths, load=load)
    assert loads and max(loads.values()) == 1


@pytest.mark.parametrize(
    ("n_images", "options", "message"),
    [
        (25, {"negatives_per_edit": 6}, "25 images are too few: 20 references \\+ 6 non-members"),
        (25, {"unedited_negatives": 9}, "25 images are too few: 20 references \\+ 9"),
        (
            21,
            {"negatives_per_edit": 1, "unedited_negatives": 0, "edits": ["overlay_bg_60"]},
            "21 images are too few: 20 references \\+ 2 non-members",
        ),
        (40, {"positives_per_edit": 21}, "positives_per_edit=21 exceeds n_references=20"),
        (40, {"edits": ["resize_40", "swirl"]}, "unknown edit 'swirl'"),
        (40, {"edits": ["hflip", "hflip"]}, "edits contains duplicates"),
        (40, {"negatives_per_edit": -1}, "negatives_per_edit must be >= 0"),
    ],
)
def test_errors_name_the_numbers(
    image_paths: list[Path], n_images: int, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        small_protocol(image_paths[:n_images], **options)


class Thumbnails:
    """A toy method: cosine similarity of mean-centred 16 x 16 grey thumbnails."""

    def __init__(self, name: str = "thumbnails", decide: bool = False) -> None:
        self.name = name
        self.decide = decide
        self.indexed: list[str] = []

    @staticmethod
    def _vector(image: Image.Image) -> np.ndarray:
        grey = np.asarray(image.convert("L").resize((16, 16)), dtype=np.float64).ravel()
        grey -= grey.mean()
        return grey / (np.linalg.norm(grey) or 1.0)

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        assert all(image.mode == "RGB" for _, image in references)
        self.indexed = [ref_id for ref_id, _ in references]
        self.matrix = np.stack([self._vector(image) for _, image in references])

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        answers: list[tuple[str | None, float, str | None]] = []
        for image in images:
            scores = self.matrix @ self._vector(image)
            best = int(scores.argmax())
            score = float(scores[best])
            decision = None
            if self.decide:
                decision = "block" if score >= 0.95 else "review" if score >= 0.8 else "allow"
            answers.append((self.indexed[best], score, decision))
        return answers


def thumbnail_load(path: Path) -> Image.Image:
    """Photos reduced to 160 px, so the end-to-end test stays fast."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.thumbnail((160, 160))
    return rgb


@pytest.fixture(scope="module")
def skimage_protocol() -> Protocol:
    paths = [skimage_photo_path(name) for name in SKIMAGE_PHOTOS]
    return build_protocol(
        paths,
        n_references=3,
        positives_per_edit=2,
        negatives_per_edit=2,
        unedited_negatives=3,
        seed=1,
        load=thumbnail_load,
    )


def test_run_protocol_and_reports(skimage_protocol: Protocol, tmp_path: Path) -> None:
    plain, deciding = Thumbnails(), Thumbnails("thumbnails+decisions", decide=True)
    results = run_protocol(skimage_protocol, [plain, deciding], load=thumbnail_load)

    queries = skimage_protocol.queries
    assert plain.indexed == [ref_id for ref_id, _ in skimage_protocol.references]
    assert [r.name for r in results] == ["thumbnails", "thumbnails+decisions"]
    for result in results:
        assert [p.query_id for p in result.predictions] == [q.query_id for q in queries]
        assert [p.true_ref_id for p in result.predictions] == [q.true_ref_id for q in queries]
        assert 0.0 <= result.micro_ap <= 1.0 and 0.0 <= result.recall_at_p99 <= 1.0
        assert result.images_per_second > 0 and result.query_seconds >= 0
        assert list(result.per_edit_recall) == list(EDITS)
        # A thumbnail survives recompression and greyscale: the right reference wins.
        for p in result.predictions:
            if p.true_ref_id is not None and p.edit in ("jpeg_q15", "greyscale", "resize_40"):
                assert p.correct, p

    no_decisions, with_decisions = results
    assert no_decisions.fpr_block is None and no_decisions.negatives_review_rate is None
    negatives = [p for p in with_decisions.predictions if p.true_ref_id is None]
    assert with_decisions.fpr_block == sum(p.decision == "block" for p in negatives) / len(
        negatives
    )
    assert with_decisions.negatives_review_rate == sum(
        p.decision == "review" for p in negatives
    ) / len(negatives)
    # Decisions set the operating point: recall counts correct "block" or "review" positives.
    for edit, recall in with_decisions.per_edit_recall.items():
        positives = [p for p in with_decisions.predictions if p.edit == edit and p.true_ref_id]
        flagged = [p for p in positives if p.correct and p.decision in ("block", "review")]
        assert recall == len(flagged) / len(positives)

    report = to_json(results, skimage_protocol, {"machine": "test"})
    text = json.dumps(report, allow_nan=False)
    (tmp_path / "report.json").write_text(text)
    loaded = json.loads(text)
    assert loaded["extra"] == {"machine": "test"}
    assert loaded["protocol"]["n_queries"] == len(queries)
    assert loaded["protocol"]["n_positives"] == 2 * len(EDITS)
    assert [m["name"] for m in loaded["methods"]] == ["thumbnails", "thumbnails+decisions"]
    assert loaded["methods"][0]["micro_ap"] == pytest.approx(no_decisions.micro_ap)
    assert len(loaded["methods"][1]["predictions"]) == len(queries)

    table = markdown_table(results)
    (tmp_path / "report.md").write_text(table)
    assert "| Method | µAP | R@P99 | FPR at block | Negatives to review | Images/s |" in table
    assert f"| thumbnails | {no_decisions.micro_ap:.3f} |" in table
    assert "| Edit | thumbnails | thumbnails+decisions |" in table
    for edit in EDITS:
        assert sum(line.startswith(f"| {edit} |") for line in table.splitlines()) == 1
    summary_row = next(line for line in table.splitlines() if line.startswith("| thumbnails |"))
    assert summary_row.count("—") == 2, "no decisions: FPR at block and review rate are blank"

    plot = tmp_path / "pr.png"
    plot_pr_curves(results, plot)
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 200


class Broken:
    def __init__(self, answers: list[tuple[str | None, float, str | None]]) -> None:
        self.name = "broken"
        self.answers = answers

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        pass

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        return self.answers[: len(images)]


def test_run_protocol_rejects_bad_answers(skimage_protocol: Protocol) -> None:
    n = len(skimage_protocol.queries)
    with pytest.raises(ValueError, match=f"returned {n - 1} answers for {n} queries"):
        run_protocol(skimage_protocol, [Broken([("x", 0.0, None)] * (n - 1))], load=thumbnail_load)
    mixed: list[tuple[str | None, float, str | None]] = [("x", 0.0, None)] * n
    mixed[0] = ("x", 0.0, "block")
    with pytest.raises(ValueError, match="decisions for 1 of"):
        run_protocol(skimage_protocol, [Broken(mixed)], load=thumbnail_load)


def test_markdown_table_marks_missing_figures() -> None:
    result = MethodResult(
        name="a|b",
        predictions=[],
        index_seconds=0.5,
        query_seconds=2.0,
        images_per_second=12.25,
        micro_ap=0.4567,
        recall_at_p99=0.0,
        threshold_at_p99=None,
        fpr_block=0.0125,
        negatives_review_rate=0.5,
        per_edit_recall={"hflip": 0.25},
    )
    table = markdown_table([result])
    assert "| a\\|b | 0.457 | 0.000 | 0.013 | 0.500 | 12.2 |" in table
    assert "| hflip | 0.25 |" in table
