"""Encoder-upgrade figures (``moderation benchmark encoder-upgrade``): migration throughput and
the shadow overhead on screening, measured in one run on a private data directory.

1. A bank that retains originals is filled with ``entries`` photos (serving encoder: the
   configured one).
2. ``moderation encoder migrate TARGET`` runs in-process (:func:`run_migration`): throughput is
   retained originals embedded per second, both embedding-only (decrypt, decode, embed, PDQ)
   and wall-clock (snapshot writes included).
3. ``uploads`` uploads (bank photos and other photos, alternating) go through the worker's
   :func:`~moderation.service.queue.process_upload` twice, without and with the shadow screener
   (:class:`~moderation.service.worker.WorkerState`); the overhead is the ratio of the mean
   time per upload, shadow over serving alone.

``random_open_clip`` builds a randomly initialised open_clip architecture as the target (its
compute is that of the real model; its decisions are meaningless), for machines without a
model hub.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank_audited
from moderation.benchmark.speed import find_images
from moderation.config import Settings
from moderation.modelops.encoder_migration import run_migration, start_migration
from moderation.service.queue import process_upload
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.uploads import create_upload
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction


def random_open_clip_checkpoint(arch: str, directory: Path) -> str:
    """Save a randomly initialised (seed 0) open_clip ``arch`` to ``directory``; returns the
    encoder name ``open_clip/<arch>/<checkpoint>``."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    checkpoint = directory / f"{arch}-random.pt"
    torch.save(model.state_dict(), checkpoint)
    return f"open_clip/{arch}/{checkpoint}"


def _screen_all(runtime: Runtime, state: WorkerState, items: list[bytes], shadow: bool) -> float:
    """Seconds to screen ``items`` one task each, with or without the shadow."""
    ids = []
    with transaction(runtime.sessions) as session:
        for data in items:
            ids.append(
                create_upload(
                    session, data, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
                ).id
            )
    start = time.perf_counter()
    for upload_id in ids:
        process_upload(
            runtime,
            upload_id,
            state.screener,
            max_attempts=3,
            shadow=state.shadow if shadow else None,
        )
    return time.perf_counter() - start


def _migrate(runtime: Runtime, target: str) -> dict[str, Any]:
    start = time.perf_counter()
    migration = start_migration(runtime, target, actor="benchmark")
    done = run_migration(runtime, migration.migration_id, actor="benchmark")
    wall = time.perf_counter() - start
    return {
        "target": target,
        "entries": done.done,
        "entries_per_second_embedding": round(done.entries_per_second or 0.0, 2),
        "entries_per_second_wall": round(done.done / wall, 2),
        "seconds": round(wall, 2),
    }


def run_encoder_upgrade_benchmark(
    settings: Settings,
    *,
    target: str | None,
    random_open_clip: str | None = None,
    entries: int = 200,
    uploads: int = 60,
    images_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) in a temporary data directory; returns the
    report (JSON-ready).

    Raises:
        ValueError: neither ``target`` nor ``random_open_clip``, or too few photos.
    """
    photos = find_images(images_dir)
    if len(photos) < entries + uploads // 2:
        raise ValueError(f"need {entries + uploads // 2} photos, found {len(photos)}")
    with tempfile.TemporaryDirectory(prefix="moderation-encoder-bench-") as tmp:
        work = Path(tmp)
        if random_open_clip:
            target = random_open_clip_checkpoint(random_open_clip, work)
        if not target:
            raise ValueError("give --target or --random-open-clip")
        runtime = prepared_runtime(settings.model_copy(update={"data_dir": work / "var"}))
        with transaction(runtime.sessions) as session:
            create_bank_audited(
                session,
                "bench",
                kind="block",
                category="default",
                actor="benchmark",
                retain_originals=True,
            )
        echo(f"importing {entries} photos with {runtime.settings.encoder}")
        import_bank(runtime, "bench", photos[:entries], actor="benchmark")
        echo(f"migrating to {target}")
        report: dict[str, Any] = {"serving": runtime.settings.encoder, "migration": {}}
        report["migration"] = _migrate(runtime, target)
        echo(f"migration: {report['migration']}")
        state = WorkerState(runtime, poll_interval=3600.0)
        state.refresh()
        others = photos[entries : entries + uploads // 2]
        items = [p.read_bytes() for pair in zip(photos, others, strict=False) for p in pair]
        _screen_all(runtime, state, items[:4], shadow=True)  # warm-up
        alone = _screen_all(runtime, state, items, shadow=False)
        shadowed = _screen_all(runtime, state, items, shadow=True)
        report["shadow"] = {
            "uploads": len(items),
            "ms_per_upload_serving_only": round(1000 * alone / len(items), 1),
            "ms_per_upload_with_shadow": round(1000 * shadowed / len(items), 1),
            "overhead_ratio": round(shadowed / alone, 2),
        }
        echo(f"shadow: {report['shadow']}")
        runtime.engine.dispose()
    return report
