"""The benchmark's detection-quality metrics, defined in :mod:`moderation.modelops.metrics` (the
golden-set canary computes the same µAP, and sits below the benchmark in the layer stack)."""

from moderation.modelops.metrics import (
    FLAGGED_DECISIONS,
    Prediction,
    decision_rates,
    micro_ap,
    per_edit_recall,
    per_edit_recall_at_decisions,
    precision_recall_curve,
    recall_at_precision,
)

__all__ = [
    "FLAGGED_DECISIONS",
    "Prediction",
    "decision_rates",
    "micro_ap",
    "per_edit_recall",
    "per_edit_recall_at_decisions",
    "precision_recall_curve",
    "recall_at_precision",
]
