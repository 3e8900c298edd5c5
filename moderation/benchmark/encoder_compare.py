"""``moderation benchmark encoders``: several encoders on the same BENCHMARKS.md protocol, in one
run.

Each encoder gets the production screening path of :mod:`moderation.benchmark.runner`
(:class:`~moderation.benchmark.runner.ScreeningMethod`: a real bank import into its own data
directory, then :class:`~moderation.matching.screening.Screener`), without and, when asked, with
the classifier stage (trained on that encoder's own import). All of them answer the same queries
(same references, edits and seeds), and their screening throughput is timed in alternating
batches of the same queries (:func:`~moderation.benchmark.runner.interleaved_throughput`), so the
load of other processes on a shared machine falls on every encoder alike: the images/s ratios are
comparable within a run, the absolute figures are not across runs.

µAP and recall at precision 0.99 rank by score and need no threshold. Decisions (the per-family
share flagged, blocks and reviews of unrelated photos) use the active policy, whose cosine
thresholds were tuned on the default encoder: for another encoder they are indicative only
(classifier decisions use probabilities, which each encoder's model calibrates).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moderation.benchmark.protocol import MethodResult, Protocol, build_protocol, run_protocol
from moderation.benchmark.report import markdown_table, to_json
from moderation.benchmark.runner import (
    EncodedQueries,
    ScreeningMethod,
    image_files,
    interleaved_throughput,
)
from moderation.config import Settings, load_settings

Stage = tuple[bool, bool]
"""(classifier stage on, query windows on)."""


def method_name(encoder: str, stage: Stage) -> str:
    """``<stage>:<encoder's last path part>``, e.g. ``classifier:efficientnet_lite1``;
    ``classifier-windows`` for the classifier stage with query windows."""
    classifier, windows = stage
    label = "global-cosine"
    if classifier:
        label = "classifier-windows" if windows else "classifier"
    return f"{label}:{encoder.rsplit('/', 1)[-1]}"


def encoder_settings(settings: Settings, base: Path, encoder: str, stage: Stage) -> Settings:
    """``settings`` with ``encoder``, the classifier stage and its query windows on or off, and
    a fresh data directory (database, dev keys, model cache) under ``base``."""
    name = method_name(encoder, stage).replace(":", "-")
    return load_settings(
        **{
            **settings.model_dump(exclude={"data_dir", "database_url", "key_file", "master_keys"}),
            "data_dir": base / name,
            "encoder": encoder,
            "classifier": stage[0],
            "classifier_windows": stage[1],
        }
    )


def comparison_rows(
    results: Sequence[MethodResult], speed: dict[str, float], baseline: str
) -> list[dict[str, Any]]:
    """One row per method: µAP, recall at precision 0.99, interleaved images/s and its ratio to
    ``baseline``'s (the same stage on the first encoder), the share of unrelated photos blocked
    and sent to review, and the per-family recall."""
    rows = []
    for result in results:
        stage = result.name.split(":", 1)[0]
        reference = speed.get(f"{stage}:{baseline}") or speed.get(result.name) or 1.0
        rows.append(
            {
                "method": result.name,
                "micro_ap": result.micro_ap,
                "recall_at_p99": result.recall_at_p99,
                "images_per_second": speed.get(result.name),
                "throughput_ratio": speed.get(result.name, 0.0) / reference,
                "fpr_block": result.fpr_block,
                "negatives_review_rate": result.negatives_review_rate,
                "per_edit_recall": result.per_edit_recall,
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| method | µAP | R@P99 | images/s (interleaved) | vs first encoder |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['micro_ap']:.3f} | {row['recall_at_p99']:.3f} | "
            f"{row['images_per_second']:.2f} | {row['throughput_ratio']:.2f} |"
        )
    return "\n".join(lines)


def _stages(settings: Settings, *, classifier: bool, window_ablation: bool) -> list[Stage]:
    """Global cosine alone, then (``classifier``) the classifier stage with query windows as
    ``settings`` say, and (``window_ablation``) the other way too."""
    stages: list[Stage] = [(False, False)]
    if classifier:
        stages.append((True, settings.classifier_windows))
        if window_ablation:
            stages.append((True, not settings.classifier_windows))
    return stages


def run_encoder_comparison(
    settings: Settings,
    images_dir: Path,
    encoders: Sequence[str],
    *,
    n_references: int = 250,
    per_edit: int = 20,
    seed: int = 0,
    classifier: bool = True,
    window_ablation: bool = False,
    json_out: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Run the protocol with every encoder in ``encoders`` (the first is the baseline), print
    the protocol's and the comparison table, optionally write JSON; return the rows. Stages:
    :func:`_stages`.

    Raises:
        ValueError: no encoder, too few images in ``images_dir``, or an unknown encoder name.
        ModuleNotFoundError: an encoder's weight package is not installed.
    """
    if not encoders:
        raise ValueError("name at least one encoder")
    started = time.perf_counter()
    protocol: Protocol = build_protocol(
        image_files(images_dir),
        n_references=n_references,
        positives_per_edit=per_edit,
        negatives_per_edit=per_edit,
        seed=seed,
    )
    encoded = EncodedQueries([q.image for q in protocol.queries])
    echo(f"protocol: {len(protocol.references)} references, {len(protocol.queries)} queries")
    stages = _stages(settings, classifier=classifier, window_ablation=window_ablation)
    with tempfile.TemporaryDirectory(prefix="moderation-encoders-") as tmp:
        methods = [
            ScreeningMethod(
                method_name(encoder, stage),
                encoder_settings(settings, Path(tmp), encoder, stage),
                dict(protocol.references),
                encoded,
                train_classifier=stage[0],
            )
            for encoder in encoders
            for stage in stages
        ]
        results = run_protocol(protocol, methods)
        images = [q.image for q in protocol.queries]
        speed = interleaved_throughput(methods, images, chunk=settings.batch_size)
    rows = comparison_rows(results, speed, encoders[0].rsplit("/", 1)[-1])
    echo(markdown_table(results))
    echo(format_rows(rows))
    echo(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    if json_out is not None:
        extra = {"encoders": list(encoders), "seed": seed, "comparison": rows}
        _write_json(json_out, to_json(results, protocol, extra=extra), echo)
    return rows


def _write_json(path: Path, document: dict[str, Any], echo: Callable[[str], Any]) -> None:
    """Write ``document`` to ``path`` (indented JSON) and say so."""
    path.write_text(json.dumps(document, indent=2))
    echo(f"wrote {path}")
