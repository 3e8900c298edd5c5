"""The "unseen implementations" split of ``moderation benchmark`` (issue 15).

:func:`~moderation.benchmark.protocol.build_protocol` adds queries made by edit implementations
that training and tuning never use (:data:`moderation.media.implementations.UNSEEN`); this module
splits each method's results into the benchmark's own figures (its 17 edits and the unedited
negatives, as before) and the unseen split (the unseen implementations' positives and negatives
and the same unedited negatives), and reports the latter with per-family flagged shares and the
issue's targets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from moderation.benchmark.metrics import (
    Prediction,
    decision_rates,
    per_edit_recall,
    per_edit_recall_at_decisions,
)
from moderation.benchmark.protocol import UNEDITED, UNSEEN_PREFIX, MethodResult, figures_of
from moderation.media.implementations import IMPLEMENTATIONS

TARGETS = {
    "micro_ap": 0.97,
    "recall_at_p99": 0.93,
    "min_family_flagged": 0.85,
    "unrelated_blocked": 0,
    "negatives_review_rate": 0.01,
}
"""Issue 15's targets on the unseen split: µAP, R@P99 and every family's flagged share at
least these, no unrelated (negative) query blocked, at most 1% of negatives sent to review."""


def is_unseen(prediction: Prediction) -> bool:
    """Whether the prediction is of an unseen-implementation query."""
    return prediction.query_id.startswith(UNSEEN_PREFIX)


def _subset(result: MethodResult, predictions: list[Prediction]) -> MethodResult:
    """``result``'s figures recomputed on ``predictions``; its query time is prorated so that
    images/s stays the whole run's."""
    share = len(predictions) / max(1, len(result.predictions))
    return figures_of(result.name, predictions, result.index_seconds, result.query_seconds * share)


def split_results(
    results: Sequence[MethodResult],
) -> tuple[list[MethodResult], list[MethodResult]]:
    """(benchmark figures without the unseen queries, unseen-split figures: the unseen queries
    and the unedited negatives); the second list is empty when no query is unseen."""
    if not any(is_unseen(p) for r in results for p in r.predictions):
        return list(results), []
    own = [_subset(r, [p for p in r.predictions if not is_unseen(p)]) for r in results]
    unseen = [
        _subset(r, [p for p in r.predictions if is_unseen(p) or p.edit == UNEDITED])
        for r in results
    ]
    return own, unseen


def family_flagged(result: MethodResult) -> dict[str, float]:
    """Share of each family's positive queries flagged (decision block or review; at the P99
    threshold for a method without decisions), families of :data:`IMPLEMENTATIONS`."""
    relabelled = [
        dataclasses.replace(p, edit=IMPLEMENTATIONS[p.edit].family)
        for p in result.predictions
        if p.edit in IMPLEMENTATIONS
    ]
    if any(p.decision is not None for p in relabelled):
        return per_edit_recall_at_decisions(relabelled)
    threshold = math.inf if result.threshold_at_p99 is None else result.threshold_at_p99
    return per_edit_recall(relabelled, threshold)


def summary(result: MethodResult) -> dict[str, Any]:
    """One method's unseen-split figures, the counts behind the rates, and each target met
    (``None`` for decision targets of a method without decisions)."""
    negatives = [p for p in result.predictions if p.true_ref_id is None]
    blocked = sum(p.decision == "block" for p in negatives)
    reviewed = sum(p.decision == "review" for p in negatives)
    decides = result.fpr_block is not None
    families = family_flagged(result)
    all_review = decision_rates(result.predictions)
    figures = {
        "micro_ap": result.micro_ap,
        "recall_at_p99": result.recall_at_p99,
        "n_queries": len(result.predictions),
        "n_positives": len(result.predictions) - len(negatives),
        "n_negatives": len(negatives),
        "unrelated_blocked": blocked if decides else None,
        "negatives_sent_to_review": reviewed if decides else None,
        "negatives_review_rate": result.negatives_review_rate,
        "positives_review_rate": all_review["positives"].get("review") if decides else None,
        "family_flagged": families,
        "implementation_flagged": dict(result.per_edit_recall),
    }
    met = {
        "micro_ap": result.micro_ap >= TARGETS["micro_ap"],
        "recall_at_p99": result.recall_at_p99 >= TARGETS["recall_at_p99"],
        "min_family_flagged": min(families.values(), default=0.0) >= TARGETS["min_family_flagged"],
        "unrelated_blocked": blocked <= TARGETS["unrelated_blocked"] if decides else None,
        "negatives_review_rate": (
            (result.negatives_review_rate or 0.0) <= TARGETS["negatives_review_rate"]
            if decides
            else None
        ),
    }
    return {"name": result.name, **figures, "targets_met": met}


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(results: Sequence[MethodResult]) -> str:
    """The unseen split as markdown: a summary table (µAP, R@P99, unrelated blocked, negatives
    sent to review, targets met) and flagged shares per family and per implementation."""
    rows = [summary(r) for r in results]
    lines = [
        "Unseen implementations (edit code never used in training or tuning):",
        "",
        "| Method | µAP | R@P99 | Unrelated blocked | Negatives to review | Targets met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        blocked = row["unrelated_blocked"]
        blocked_cell = "—" if blocked is None else f"{blocked}/{row['n_negatives']}"
        met = [k for k, v in row["targets_met"].items() if v]
        missed = [k for k, v in row["targets_met"].items() if v is False]
        targets = f"{len(met)}/{len(met) + len(missed)}"
        if missed:
            targets += f" (missed: {', '.join(missed)})"
        lines.append(
            f"| {row['name']} | {_cell(row['micro_ap'])} | {_cell(row['recall_at_p99'])} "
            f"| {blocked_cell} | {_cell(row['negatives_review_rate'])} | {targets} |"
        )
    for key, title in (("family_flagged", "Family"), ("implementation_flagged", "Implementation")):
        names = list(dict.fromkeys(k for row in rows for k in row[key]))
        lines += ["", f"| {title} | " + " | ".join(r["name"] for r in rows) + " |"]
        lines.append("|---|" + "---:|" * len(rows))
        for name in names:
            lines.append(
                f"| {name} | " + " | ".join(_cell(r[key].get(name), 2) for r in rows) + " |"
            )
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[MethodResult]) -> dict[str, Any]:
    """The unseen split for the benchmark's JSON report: targets, each method's
    :func:`summary` and its predictions on the split's queries."""
    return {
        "targets": TARGETS,
        "implementations": sorted({p.edit for r in results for p in r.predictions if is_unseen(p)}),
        "methods": [
            {
                **summary(r),
                "predictions": [
                    {
                        "query_id": p.query_id,
                        "ref_id": p.ref_id,
                        "score": p.score if math.isfinite(p.score) else None,
                        "true_ref_id": p.true_ref_id,
                        "edit": p.edit,
                        "decision": p.decision,
                    }
                    for p in r.predictions
                ],
            }
            for r in results
        ],
    }
