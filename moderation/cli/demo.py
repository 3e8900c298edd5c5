"""``moderation demo``: a bank of real photos, then edited copies and unrelated photos screened.

Uses only the photos scikit-image ships in its wheel, so it runs on a fresh machine. State goes
to ``<data_dir>/demo`` (recreated on every run) so it never touches a real deployment's data.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from moderation.config import Settings, load_settings

if TYPE_CHECKING:
    from rich.table import Table

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
)


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


def prepare_files(workdir: Path) -> tuple[Path, list[tuple[Path, str, str]]]:
    """Write the bank folder and the query files; returns (bank dir, [(path, kind, edit)])."""
    from moderation.media.edits import apply_edit

    bank_dir = workdir / "bank"
    query_dir = workdir / "queries"
    bank_dir.mkdir(parents=True)
    query_dir.mkdir(parents=True)
    queries: list[tuple[Path, str, str]] = []
    background = Image.open(skimage_photo_file("hubble_deep_field")).convert("RGB")
    for index, name in enumerate(BANNED):
        original = Image.open(skimage_photo_file(name)).convert("RGB")
        original.save(bank_dir / f"{name}.png")
        for offset, edit in enumerate(DEMO_EDITS):
            if (index + offset) % 2:  # half of the edits per photo keeps the demo short
                continue
            edited = apply_edit(
                edit, original, seed=1000 + index * 31 + offset, background=background
            )
            path = query_dir / f"{name}--{edit}.jpg"
            _save_jpeg(edited, path)
            queries.append((path, "copy", edit))
    for name in UNRELATED:
        try:
            image = Image.open(skimage_photo_file(name)).convert("RGB")
        except FileNotFoundError:
            continue
        path = query_dir / f"unrelated-{name}.jpg"
        _save_jpeg(image, path)
        queries.append((path, "unrelated", "none"))
    gif = skimage_photo_file("no_time_for_that_tiny")
    shutil.copy(gif, query_dir / "unrelated-animated.gif")
    queries.append((query_dir / "unrelated-animated.gif", "unrelated", "animated"))
    broken = query_dir / "broken-truncated.jpg"
    broken.write_bytes((query_dir / f"{BANNED[0]}--jpeg_q15.jpg").read_bytes()[:2000])
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
        }
    )
    return prepared_runtime(demo_settings)


def _results_table(
    queries: list[tuple[Path, str, str]], rows: list[dict[str, Any]]
) -> tuple[Table, int, int]:
    """The table of every query's result, the edited copies flagged (block or review) and the
    unrelated photos allowed."""
    from rich.table import Table

    table = Table("file", "kind", "edit", "decision", "score", "match", "ms")
    flagged = allowed = 0
    for (path, kind, edit), row in zip(queries, rows, strict=True):
        match = row["matches"][0]["label"] if row["matches"] else (row["reason"] or "")
        score = "" if row["score"] is None else f"{row['score']:.3f}"
        table.add_row(
            path.name,
            kind,
            edit,
            row["decision"],
            score,
            match,
            f"{row['timings_ms']['total']:.0f}",
        )
        if kind == "copy" and row["decision"] in ("block", "review"):
            flagged += 1
        if kind == "unrelated" and row["decision"] == "allow":
            allowed += 1
    return table, flagged, allowed


def run_demo(settings: Settings, *, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the demo end to end and print a table; returns summary counts."""
    from rich.console import Console

    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.service.operations import screen_paths
    from moderation.storage.db import transaction

    started = time.perf_counter()
    root = settings.resolved_data_dir / "demo"
    runtime = _demo_runtime(settings, root)
    demo_settings = runtime.settings
    bank_dir, queries = prepare_files(root / "files")
    echo(f"demo data directory: {demo_settings.resolved_data_dir}")
    echo(f"encoder: {demo_settings.encoder} (loading weights...)")
    with transaction(runtime.sessions) as session:
        create_bank(session, "demo-banned", kind="block", category="default")
    report = import_bank(runtime, "demo-banned", [bank_dir], actor="demo")
    echo(
        f"bank demo-banned: {len(report.added)} photos imported as encrypted signals "
        f"(snapshot v{report.snapshot_version}); originals not kept"
    )
    rows: list[dict[str, Any]] = []
    screen_paths(runtime, [q[0] for q in queries], on_result=rows.append, actor="demo")
    table, flagged, allowed = _results_table(queries, rows)
    copies = sum(1 for q in queries if q[1] == "copy")
    unrelated = sum(1 for q in queries if q[1] == "unrelated")
    Console(width=int(os.environ.get("COLUMNS", "130"))).print(table)
    elapsed = time.perf_counter() - started
    echo(
        f"edited copies flagged: {flagged}/{copies}; unrelated photos allowed: "
        f"{allowed}/{unrelated}; total {elapsed:.1f} s"
    )
    echo(
        "explore further: MODERATION_DATA_DIR="
        f"{demo_settings.resolved_data_dir} moderation bank entries demo-banned"
    )
    return {"copies": copies, "flagged": flagged, "unrelated": unrelated, "allowed": allowed}
