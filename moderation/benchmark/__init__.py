"""Detection-quality benchmark of BENCHMARKS.md: edits, protocol, metrics and reports.

A scaled-down Image Similarity Challenge 2021 protocol (Douze et al. 2021, "The 2021 Image
Similarity Dataset and Challenge"): :func:`build_protocol` makes edited queries of reference and
non-member photos, :func:`run_protocol` runs any :class:`Method` on them and computes µAP, recall
at precision 0.99, the false positive rate at the block decision and per-edit recall, and
:mod:`moderation.benchmark.report` writes JSON, markdown and a precision-recall plot.
"""

from moderation.benchmark.metrics import (
    Prediction,
    decision_rates,
    micro_ap,
    per_edit_recall,
    per_edit_recall_at_decisions,
    precision_recall_curve,
    recall_at_precision,
)
from moderation.benchmark.protocol import (
    UNEDITED,
    Method,
    MethodResult,
    Protocol,
    Query,
    build_protocol,
    run_protocol,
)
from moderation.benchmark.report import markdown_table, plot_pr_curves, to_json
from moderation.media.edits import EDITS, EditFn, apply_edit

__all__ = [
    "EDITS",
    "UNEDITED",
    "EditFn",
    "Method",
    "MethodResult",
    "Prediction",
    "Protocol",
    "Query",
    "apply_edit",
    "build_protocol",
    "decision_rates",
    "markdown_table",
    "micro_ap",
    "per_edit_recall",
    "per_edit_recall_at_decisions",
    "plot_pr_curves",
    "precision_recall_curve",
    "recall_at_precision",
    "run_protocol",
    "to_json",
]
