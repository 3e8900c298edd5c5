"""``moderation demo``: a bank of real photos, then edited copies and unrelated photos screened.

Uses only the photos scikit-image ships in its wheel, so it runs on a fresh machine. State goes
to ``<data_dir>/demo`` (recreated on every run) so it never touches a real deployment's data.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from moderation.benchmark.demo_figures import (
    HIGHLIGHTED_EDITS,
    PDQ_BASELINE,
    DemoItem,
    PhaseFigures,
    before_after_table,
    caught_lines,
    phase_figures,
)
from moderation.config import Settings, load_settings

if TYPE_CHECKING:
    from rich.table import Table

    from moderation.banks.importer import ImportReport
    from moderation.matching.classifier.training import TrainReport
    from moderation.service.runtime import Runtime

BANNED = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
UNRELATED = ("hubble_deep_field", "camera", "retina", "ihc", "page", "brick", "grass")
DEMO_EDITS = (
    "jpeg_q15",
    "center_crop_70",
    "hflip",
    "text_overlay",
    "meme_caption",
    "border_25",
    "screenshot",
    "rotate_15",
    "overlay_bg_60",
)
"""Edits of the demo's copies: half of them per photo, plus every highlighted family
(:data:`moderation.benchmark.demo_figures.HIGHLIGHTED_EDITS`) for every photo."""
DEMO_TRAINING_EDITS = 8
"""Edited copies of each bank photo made for classifier training at import (the setting
``classifier_edits_per_entry``, default 2): five photos need about 40 copies so that the
fitting, calibration and held-out splits of ``classifier train`` each hold copies."""


def skimage_photo_file(name: str) -> Path:
    """The file of a photo shipped in scikit-image's wheel.

    Raises:
        FileNotFoundError: no such photo in this scikit-image version.
    """
    from skimage import data

    base = Path(data.__file__).parent
    for candidate in sorted(base.iterdir()):
        if candidate.stem == name and candidate.suffix in {".png", ".jpg", ".gif", ".tif"}:
            return candidate
    raise FileNotFoundError(f"scikit-image ships no photo named {name!r}")


def _save_jpeg(image: Image.Image, path: Path, quality: int = 90) -> None:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


Photos = Sequence[tuple[str, Path]]
"""Named photo files: ``(name, path)``."""


def demo_photos(images_dir: Path | None, bank_size: int = 20) -> tuple[Photos, Photos]:
    """The bank photos and the unrelated photos: from ``images_dir`` (its image files in name
    order: the first ``bank_size`` banned, the next ``bank_size`` unrelated), else
    :data:`BANNED` and :data:`UNRELATED` of scikit-image (those this version ships).

    Raises:
        ValueError: ``images_dir`` holds fewer than ``bank_size + 1`` images.
    """
    if images_dir is None:
        unrelated = []
        for name in UNRELATED:
            try:
                unrelated.append((name, skimage_photo_file(name)))
            except FileNotFoundError:
                continue
        return [(n, skimage_photo_file(n)) for n in BANNED], unrelated
    from moderation.benchmark.speed import IMAGE_SUFFIXES

    found = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) <= bank_size:
        raise ValueError(f"{images_dir} holds {len(found)} images; the demo needs {bank_size + 1}")
    named = [(p.stem, p) for p in found[: 2 * bank_size]]
    return named[:bank_size], named[bank_size:]


def prepare_files(
    workdir: Path, photos: tuple[Photos, Photos] | None = None
) -> tuple[Path, list[tuple[Path, str, str]]]:
    """Write the bank folder and the query files of ``photos`` (banned, unrelated; default
    :func:`demo_photos`); returns (bank dir, [(path, kind, edit)])."""
    from moderation.media.edits import apply_edit

    banned, unrelated = photos or demo_photos(None)

    bank_dir = workdir / "bank"
    query_dir = workdir / "queries"
    bank_dir.mkdir(parents=True)
    query_dir.mkdir(parents=True)
    queries: list[tuple[Path, str, str]] = []
    background = Image.open(skimage_photo_file("hubble_deep_field")).convert("RGB")
    for index, (name, source) in enumerate(banned):
        original = Image.open(source).convert("RGB")
        original.save(bank_dir / f"{name}.png")
        for offset, edit in enumerate(DEMO_EDITS):
            # Half of the other edits per photo keeps the demo short.
            if (index + offset) % 2 and edit not in HIGHLIGHTED_EDITS:
                continue
            edited = apply_edit(
                edit, original, seed=1000 + index * 31 + offset, background=background
            )
            path = query_dir / f"{name}--{edit}.jpg"
            _save_jpeg(edited, path)
            queries.append((path, "copy", edit))
    for name, source in unrelated:
        image = Image.open(source).convert("RGB")
        path = query_dir / f"unrelated-{name}.jpg"
        _save_jpeg(image, path)
        queries.append((path, "unrelated", "none"))
    gif = skimage_photo_file("no_time_for_that_tiny")
    shutil.copy(gif, query_dir / "unrelated-animated.gif")
    queries.append((query_dir / "unrelated-animated.gif", "unrelated", "animated"))
    broken = query_dir / "broken-truncated.jpg"
    broken.write_bytes((query_dir / f"{banned[0][0]}--jpeg_q15.jpg").read_bytes()[:2000])
    queries.append((broken, "broken", "truncated"))
    return bank_dir, queries


def _demo_runtime(settings: Settings, root: Path) -> Runtime:
    """A fresh deployment in ``root`` (removed first): ``settings`` with its own data dir, SQLite
    database and development key file, migrated."""
    from moderation.service.runtime import prepared_runtime

    if root.exists():
        shutil.rmtree(root)
    demo_settings = load_settings(
        **{
            **settings.model_dump(exclude={"data_dir", "database_url", "key_file"}),
            "data_dir": root / "var",
            "database_url": None,
            "key_file": None,
            "classifier": True,
            "classifier_edits_per_entry": DEMO_TRAINING_EDITS,
        }
    )
    return prepared_runtime(demo_settings)


def _results_table(items: Sequence[DemoItem]) -> tuple[Table, int, int]:
    """The table of every item's result, the edited copies flagged (block or review) and the
    unrelated photos allowed."""
    from rich.table import Table

    table = Table("file", "kind", "edit", "decision", "score", "match", "signals", "ms")
    flagged = allowed = 0
    for item in items:
        row = item.result.to_json()
        match = row["matches"][0]["label"] if row["matches"] else (row["reason"] or "")
        score = "" if row["score"] is None else f"{row['score']:.3f}"
        signals = ",".join(item.result.matches[0].signals) if item.result.matches else ""
        table.add_row(
            item.path.name,
            item.kind,
            item.edit,
            row["decision"],
            score,
            match,
            signals,
            f"{row['timings_ms']['total']:.0f}",
        )
        if item.kind == "copy" and row["decision"] in ("block", "review"):
            flagged += 1
        if item.kind == "unrelated" and row["decision"] == "allow":
            allowed += 1
    return table, flagged, allowed


def _screen(runtime: Runtime, queries: list[tuple[Path, str, str]]) -> list[DemoItem]:
    """Screen every query file once (stored as uploads, actor ``demo``)."""
    from moderation.service.operations import screen_paths

    results = screen_paths(runtime, [q[0] for q in queries], on_result=lambda _: None, actor="demo")
    return [
        DemoItem(path, kind, edit, path.name.split("--")[0] if kind == "copy" else None, result)
        for (path, kind, edit), result in zip(queries, results, strict=True)
    ]


def _entry_names(bank_dir: Path, entry_of: dict[str, int]) -> dict[str, str]:
    """Public entry id (``e_3``) -> bank photo name, through the SHA-256 of each bank file."""
    names = {}
    for path in sorted(bank_dir.iterdir()):
        entry_id = entry_of.get(hashlib.sha256(path.read_bytes()).hexdigest())
        if entry_id is not None:
            names[f"e_{entry_id}"] = path.stem
    return names


def _train(runtime: Runtime, echo: Callable[[str], Any]) -> TrainReport:
    """``moderation classifier train``'s code path: fit on the bank's synthetic pairs, gated by
    the golden-set canary; prints the outcome."""
    from moderation.matching.classifier.training import train
    from moderation.modelops.canary import canary_gate

    started = time.perf_counter()
    report = train(runtime, actor="demo", gate=canary_gate(runtime))
    held_out = report.after.get("average_precision", float("nan"))
    echo(
        f"classifier {report.version}: {'activated' if report.activated else 'NOT activated'} "
        f"({report.pairs['total']} pairs, held-out AP {held_out:.3f}, "
        f"{time.perf_counter() - started:.1f} s); {report.reason}"
    )
    return report


def _write_outputs(
    out_dir: Path,
    passes: tuple[list[DemoItem], list[DemoItem]],
    names: dict[str, str],
    bank_dir: Path,
) -> tuple[PhaseFigures, PhaseFigures, Path, Path]:
    """Figures of both passes, the PR plot (``pr-curves.png``) and the HTML report
    (``report.html``) in ``out_dir``."""
    from moderation.benchmark.demo_figures import method_result, pdq_predictions, predictions
    from moderation.benchmark.demo_report import render_report
    from moderation.benchmark.report import plot_pr_curves

    before_items, after_items = passes
    before_result = method_result("before training", predictions(before_items, names))
    after_result = method_result("after training", predictions(after_items, names))
    pdq_result = method_result(PDQ_BASELINE, pdq_predictions(after_items, names))
    figures = (
        phase_figures(before_items, before_result),
        phase_figures(after_items, after_result),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = out_dir / "pr-curves.png"
    plot_pr_curves([before_result, after_result, pdq_result], plot)
    bank_files = {p.stem: p for p in bank_dir.iterdir()}
    report = out_dir / "report.html"
    report.write_text(render_report(passes, names, bank_files, figures, plot), encoding="utf-8")
    return figures[0], figures[1], plot, report


def _import_bank(runtime: Runtime, bank_dir: Path, echo: Callable[[str], Any]) -> ImportReport:
    """Create the block bank ``demo-banned`` and import ``bank_dir`` into it."""
    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.storage.db import transaction

    with transaction(runtime.sessions) as session:
        create_bank(session, "demo-banned", kind="block", category="default")
    report = import_bank(runtime, "demo-banned", [bank_dir], actor="demo")
    echo(
        f"bank demo-banned: {len(report.added)} photos imported as encrypted signals "
        f"(snapshot v{report.snapshot_version}, {report.training_pairs} training pairs); "
        "originals not kept"
    )
    return report


def _echo_paths(echo: Callable[[str], Any], plot: Path, report: Path, data_dir: Path) -> None:
    """Where the plot, the report and the demo's state are."""
    echo(f"precision-recall plot: {plot}")
    echo(f"HTML report (demo artefact, sample photos only): {report}")
    echo(f"explore further: MODERATION_DATA_DIR={data_dir} moderation bank entries demo-banned")


def run_demo(
    settings: Settings,
    *,
    echo: Callable[[str], Any] = print,
    images_dir: Path | None = None,
    bank_size: int = 20,
) -> dict[str, Any]:
    """Run the demo end to end: import the bank, screen, train the classifier, screen again;
    print the results and the before/after figures, write the PR plot and the HTML report.
    Photos: scikit-image's, else ``images_dir`` (:func:`demo_photos`). Returns summary counts
    (after training), both passes' figures and the output paths.

    Raises:
        ValueError: ``images_dir`` holds too few images, or the classifier cannot be trained.
    """
    from rich.console import Console

    started = time.perf_counter()
    root = settings.resolved_data_dir / "demo"
    photos = demo_photos(images_dir, bank_size)
    runtime = _demo_runtime(settings, root)
    demo_settings = runtime.settings
    bank_dir, queries = prepare_files(root / "files", photos)
    echo(f"demo data directory: {demo_settings.resolved_data_dir}")
    echo(f"photos: {images_dir or 'scikit-image sample photos'}")
    echo(f"encoder: {demo_settings.encoder} (loading weights...)")
    report = _import_bank(runtime, bank_dir, echo)
    before = _screen(runtime, queries)
    trained = _train(runtime, echo)
    after = _screen(runtime, queries)
    console = Console(width=int(os.environ.get("COLUMNS", "130")))
    table, flagged, allowed = _results_table(after)
    console.print(table)
    names = _entry_names(bank_dir, report.entry_of)
    fig_before, fig_after, plot, html_report = _write_outputs(
        root / "report", (before, after), names, bank_dir
    )
    console.print(before_after_table(fig_before, fig_after))
    for line in caught_lines(fig_before, fig_after):
        echo(line)
    copies, unrelated = (sum(q[1] == kind for q in queries) for kind in ("copy", "unrelated"))
    echo(
        f"after training: edited copies flagged: {flagged}/{copies}; unrelated photos allowed: "
        f"{allowed}/{unrelated}; total {time.perf_counter() - started:.1f} s"
    )
    _echo_paths(echo, plot, html_report, demo_settings.resolved_data_dir)
    return {
        "copies": copies,
        "flagged": flagged,
        "unrelated": unrelated,
        "allowed": allowed,
        "classifier_version": trained.version,
        "classifier_activated": trained.activated,
        "before": fig_before.to_json(),
        "after": fig_after.to_json(),
        "plot": plot,
        "report": html_report,
        "items": len(after),
    }
