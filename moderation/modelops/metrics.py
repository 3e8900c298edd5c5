"""Detection-quality metrics (benchmark and golden-set canary): µAP, precision-recall, R@P.

The protocol is the one of the Image Similarity Challenge 2021 (Douze et al. 2021, "The 2021 Image
Similarity Dataset and Challenge", arXiv:2106.09672, section 3.3; reference code
facebookresearch/isc2021 ``isc/metrics.py``): a method returns, for each query, a predicted
reference and a score; a prediction is correct when the reference is the query's true source.

Conventions shared by every function here:

* Only predictions with a ``ref_id`` take part in rankings and thresholds (a prediction without
  a reference predicts nothing, as a query absent from an ISC submission); recall is always
  divided by the number of *positive queries* (distinct ``query_id`` with a ``true_ref_id``),
  whether or not the method predicted anything for them.
* Ties in score are broken deterministically and pessimistically: within equal scores incorrect
  predictions rank before correct ones (then by ``query_id``, ``ref_id``), so µAP never profits
  from an arbitrary order. A threshold cannot split a tie, so the precision-recall curve has one
  point per distinct score, counting every prediction with ``score >= threshold``.
* A ``(query_id, ref_id)`` pair may appear once; a duplicate raises ``ValueError``, as would a
  NaN score.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FLAGGED_DECISIONS: frozenset[str] = frozenset({"block", "review"})
"""Decisions that count as a detection at a method's own operating point: the image is held back
(``block``) or sent to a human (``review``)."""


@dataclass(frozen=True)
class Prediction:
    """One method's answer for one query, with the ground truth beside it.

    ``ref_id`` is the best-matching reference (None when the method returned none), ``score``
    its similarity (higher is more similar; any scale), ``true_ref_id`` the reference the query
    was made from (None for a negative query), ``edit`` the edit that made the query, and
    ``decision`` the method's own verdict (``allow``, ``review``, ``block``, ...) if it has one.
    """

    query_id: str
    ref_id: str | None
    score: float
    true_ref_id: str | None
    edit: str
    decision: str | None = None

    @property
    def correct(self) -> bool:
        """Whether the predicted reference is the query's true source."""
        return self.true_ref_id is not None and self.ref_id == self.true_ref_id


def _positive_queries(predictions: Iterable[Prediction]) -> set[str]:
    return {p.query_id for p in predictions if p.true_ref_id is not None}


def _ranked(
    predictions: Sequence[Prediction],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], int]:
    """Scores (descending) and correctness of the predictions with a reference, in the
    pessimistic tie order, and the number of positive queries."""
    n_positives = len(_positive_queries(predictions))
    if n_positives == 0:
        raise ValueError("no positive queries (no prediction has a true_ref_id)")
    seen: set[tuple[str, str]] = set()
    kept: list[Prediction] = []
    for p in predictions:
        if p.ref_id is None:
            continue
        if math.isnan(p.score):
            raise ValueError(f"NaN score for query {p.query_id!r}")
        if (p.query_id, p.ref_id) in seen:
            raise ValueError(f"duplicate prediction ({p.query_id!r}, {p.ref_id!r})")
        seen.add((p.query_id, p.ref_id))
        kept.append(p)
    kept.sort(key=lambda p: (-p.score, p.correct, p.query_id, p.ref_id or ""))
    scores = np.fromiter((p.score for p in kept), dtype=np.float64, count=len(kept))
    correct = np.fromiter((p.correct for p in kept), dtype=np.bool_, count=len(kept))
    return scores, correct, n_positives


def micro_ap(predictions: Sequence[Prediction]) -> float:
    """Micro average precision (µAP) of ISC 2021 (Douze et al. 2021, section 3.3).

    All predictions of all queries are ranked by score, descending (ties pessimistic, see the
    module docstring); µAP is the sum of the precision at each correct prediction divided by the
    number of positive queries, so positives the method missed count as zero precision.

    Returns:
        µAP in [0, 1].

    Raises:
        ValueError: no positive query, a NaN score or a duplicate ``(query_id, ref_id)``.
    """
    _, correct, n_positives = _ranked(predictions)
    hits = np.cumsum(correct)
    ranks = np.arange(1, correct.size + 1)
    return float(np.sum(hits[correct] / ranks[correct]) / n_positives)


def precision_recall_curve(
    predictions: Sequence[Prediction],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Precision and recall at every distinct score used as a threshold.

    Point ``k`` counts the predictions with ``score >= thresholds[k]``: precision is the share of
    them that are correct, recall the number of correct ones over the number of positive queries.

    Returns:
        ``(precision, recall, thresholds)``, three float64 arrays of shape ``(k,)`` with ``k`` the
        number of distinct scores, thresholds strictly decreasing (so recall is non-decreasing).
        Empty arrays when no prediction has a reference.

    Raises:
        ValueError: as :func:`micro_ap`.
    """
    scores, correct, n_positives = _ranked(predictions)
    if scores.size == 0:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty.copy(), empty.copy()
    # The last index of each run of equal scores closes that threshold's group.
    last_of_group = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    true_positives = np.cumsum(correct)[last_of_group].astype(np.float64)
    precision = true_positives / (last_of_group + 1)
    recall = true_positives / n_positives
    return precision, recall, scores[last_of_group].copy()


def recall_at_precision(
    predictions: Sequence[Prediction], precision: float = 0.99
) -> tuple[float, float | None]:
    """Recall at the highest-recall threshold whose precision is at least ``precision`` (R@P99
    for the default, BENCHMARKS.md).

    Among thresholds of equal recall the highest is returned (it has the best precision).

    Returns:
        ``(recall, threshold)``; ``(0.0, None)`` when no threshold reaches the precision.

    Raises:
        ValueError: as :func:`micro_ap`.
    """
    precisions, recalls, thresholds = precision_recall_curve(predictions)
    # Tolerance so that e.g. 99 correct of 100 (0.99 in floating point) meets 0.99.
    meets = precisions >= precision - 1e-12
    if not meets.any():
        return 0.0, None
    best = float(recalls[meets].max())
    index = int(np.flatnonzero(meets & (recalls == best))[0])
    return best, float(thresholds[index])


def _per_edit(predictions: Sequence[Prediction], detected: set[str]) -> dict[str, float]:
    positives: dict[str, set[str]] = {}
    for p in predictions:
        if p.true_ref_id is not None:
            positives.setdefault(p.edit, set()).add(p.query_id)
    return {edit: len(ids & detected) / len(ids) for edit, ids in positives.items()}


def per_edit_recall(predictions: Sequence[Prediction], threshold: float) -> dict[str, float]:
    """For each edit with positive queries, the share of them with a correct prediction scoring
    at least ``threshold``.

    Returns:
        ``{edit: recall}`` in the order edits first appear; edits without positives are absent.
    """
    detected = {p.query_id for p in predictions if p.correct and p.score >= threshold}
    return _per_edit(predictions, detected)


def per_edit_recall_at_decisions(
    predictions: Sequence[Prediction], flagged: Collection[str] = FLAGGED_DECISIONS
) -> dict[str, float]:
    """For each edit with positive queries, the share of them with a correct prediction whose
    decision is in ``flagged`` (the method's own operating point instead of a threshold).

    Returns:
        ``{edit: recall}`` in the order edits first appear; edits without positives are absent.
    """
    detected = {p.query_id for p in predictions if p.correct and p.decision in flagged}
    return _per_edit(predictions, detected)


def decision_rates(predictions: Sequence[Prediction]) -> dict[str, dict[str, float]]:
    """Share of each decision among the predictions for positive and for negative queries.

    A missing decision is counted under ``"none"``. With one prediction per query (as
    :func:`moderation.benchmark.protocol.run_protocol` produces) these are shares of queries,
    e.g. ``rates["negatives"]["block"]`` is the false positive rate at the block threshold.

    Returns:
        ``{"positives": {decision: share}, "negatives": {decision: share}}``, decisions sorted
        by name, shares summing to 1 (an empty group gives an empty dict).
    """
    counts: dict[str, dict[str, int]] = {"positives": {}, "negatives": {}}
    for p in predictions:
        group = counts["positives" if p.true_ref_id is not None else "negatives"]
        key = p.decision if p.decision is not None else "none"
        group[key] = group.get(key, 0) + 1
    return {
        group: {key: n / sum(tally.values()) for key, n in sorted(tally.items())}
        for group, tally in counts.items()
    }
