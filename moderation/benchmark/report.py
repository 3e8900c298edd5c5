"""Benchmark reports (BENCHMARKS.md): a JSON document, markdown tables and a precision-recall
plot of :class:`~moderation.benchmark.protocol.MethodResult` lists."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moderation.benchmark.metrics import decision_rates, precision_recall_curve
from moderation.benchmark.protocol import MethodResult, Protocol


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity; they become null."""
    return None if value is None or not math.isfinite(value) else value


def _protocol_json(protocol: Protocol) -> dict[str, Any]:
    """The protocol's references and queries' ground truth (never images)."""
    queries = protocol.queries
    edits = list(dict.fromkeys(q.edit for q in queries))
    return {
        "seed": protocol.seed,
        "n_references": len(protocol.references),
        "n_queries": len(queries),
        "n_positives": sum(q.true_ref_id is not None for q in queries),
        "n_negatives": sum(q.true_ref_id is None for q in queries),
        "edits": edits,
        "references": [
            {"ref_id": ref_id, "path": str(path)} for ref_id, path in protocol.references
        ],
        "queries": [
            {
                "query_id": q.query_id,
                "edit": q.edit,
                "true_ref_id": q.true_ref_id,
                "source": q.source,
                "seed": q.seed,
                "background": q.background,
                "family": q.family,
                "width": q.image.width,
                "height": q.image.height,
            }
            for q in queries
        ],
    }


def _method_json(r: MethodResult) -> dict[str, Any]:
    """One method's figures, decision rates and predictions."""
    return {
        "name": r.name,
        "micro_ap": _finite(r.micro_ap),
        "recall_at_p99": _finite(r.recall_at_p99),
        "threshold_at_p99": _finite(r.threshold_at_p99),
        "fpr_block": _finite(r.fpr_block),
        "negatives_review_rate": _finite(r.negatives_review_rate),
        "index_seconds": _finite(r.index_seconds),
        "query_seconds": _finite(r.query_seconds),
        "images_per_second": _finite(r.images_per_second),
        "per_edit_recall": dict(r.per_edit_recall),
        "decision_rates": decision_rates(r.predictions),
        "predictions": [
            {
                "query_id": p.query_id,
                "ref_id": p.ref_id,
                "score": _finite(p.score),
                "true_ref_id": p.true_ref_id,
                "edit": p.edit,
                "decision": p.decision,
            }
            for p in r.predictions
        ],
    }


def to_json(
    results: Sequence[MethodResult], protocol: Protocol, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON-serialisable report: the protocol (references, queries' ground truth, edit seeds,
    backgrounds and sizes, never images), each method's figures, decision rates and predictions,
    and ``extra`` (e.g. machine, versions, settings) as given.

    Non-finite floats become null. Times are in seconds.
    """
    return {
        "protocol": _protocol_json(protocol),
        "methods": [_method_json(r) for r in results],
        "extra": dict(extra) if extra is not None else {},
    }


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _name(name: str) -> str:
    return name.replace("|", "\\|")


def markdown_table(results: Sequence[MethodResult]) -> str:
    """Two markdown tables: a summary (method, µAP, R@P99, FPR at block, negatives sent to
    review, images/s; "—" where a method has no decisions) and per-edit recall at each method's
    operating point (one row per edit, one column per method)."""
    lines = [
        "| Method | µAP | R@P99 | FPR at block | Negatives to review | Images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {_name(r.name)} | {_cell(r.micro_ap, 3)} | {_cell(r.recall_at_p99, 3)} "
            f"| {_cell(r.fpr_block, 3)} | {_cell(r.negatives_review_rate, 3)} "
            f"| {_cell(r.images_per_second, 1)} |"
        )
    edits = list(dict.fromkeys(edit for r in results for edit in r.per_edit_recall))
    lines += [
        "",
        "| Edit | " + " | ".join(_name(r.name) for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for edit in edits:
        cells = " | ".join(_cell(r.per_edit_recall.get(edit), 2) for r in results)
        lines.append(f"| {edit} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_pr_curves(results: Sequence[MethodResult], path: Path) -> None:
    """Save a precision-recall plot (PNG, or any format matplotlib infers from ``path``'s
    suffix) with one step curve per method, labelled with its µAP, and the precision 0.99 line of
    R@P99. Uses the Agg canvas directly, so no display and no global pyplot state."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for r in results:
        precision, recall, _ = precision_recall_curve(r.predictions)
        if precision.size == 0:
            precision, recall = np.zeros(1), np.zeros(1)
        # Precision at recall 0 is drawn as the first point's, as sklearn's display does.
        axes.plot(
            np.concatenate(([0.0], recall)),
            np.concatenate((precision[:1], precision)),
            drawstyle="steps-pre",
            label=f"{r.name} (µAP {r.micro_ap:.3f})",
        )
    axes.axhline(0.99, color="grey", linestyle=":", linewidth=1, label="precision 0.99")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("Recall (correct predictions / positive queries)")
    axes.set_ylabel("Precision")
    axes.set_title("Precision-recall of near-duplicate detection")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    figure.savefig(path, dpi=120)
