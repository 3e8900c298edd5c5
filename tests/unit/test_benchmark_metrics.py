"""Benchmark metrics on hand-computed examples, and against scikit-learn where they must agree."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from moderation.benchmark.metrics import (
    Prediction,
    decision_rates,
    micro_ap,
    per_edit_recall,
    per_edit_recall_at_decisions,
    precision_recall_curve,
    recall_at_precision,
)


def pos(qid: str, ref: str | None, score: float, true: str, edit: str = "e") -> Prediction:
    return Prediction(qid, ref, score, true, edit)


def neg(qid: str, ref: str | None, score: float, edit: str = "e") -> Prediction:
    return Prediction(qid, ref, score, None, edit)


# Ranked by score: correct, wrong, correct, wrong, correct, wrong; four positive queries.
RANKED = [
    pos("q1", "A", 0.9, "A"),
    neg("n1", "B", 0.8),
    pos("q2", "B", 0.7, "B"),
    pos("q3", "X", 0.6, "C"),  # a positive query matched to the wrong reference
    pos("q4", "D", 0.5, "D"),
    neg("n2", "E", 0.4),
]


def test_micro_ap_hand_computed() -> None:
    # Precision at the three correct predictions: 1/1, 2/3, 3/5; divided by 4 positives.
    assert micro_ap(RANKED) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # The input order does not matter.
    assert micro_ap(list(reversed(RANKED))) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)


def test_missed_positives_count_in_the_denominator() -> None:
    # q5 got no reference at all, q6 only one below every other: both are positives.
    with_missed = [*RANKED, pos("q5", None, 0.99, "F")]
    assert micro_ap(with_missed) == pytest.approx((1 + 2 / 3 + 3 / 5) / 5)
    assert micro_ap([*with_missed, pos("q6", "G", 0.1, "G")]) == pytest.approx(
        (1 + 2 / 3 + 3 / 5 + 4 / 7) / 6
    )


def test_ties_rank_incorrect_predictions_first() -> None:
    tied = [pos("q1", "A", 0.9, "A"), neg("n1", "B", 0.9), pos("q2", "C", 0.5, "C")]
    # Pessimistic order n1, q1, q2: precisions 1/2 and 2/3 (optimistic would give 1 and 2/3).
    expected = (1 / 2 + 2 / 3) / 2
    for order in (tied, tied[::-1], [tied[1], tied[2], tied[0]]):
        assert micro_ap(order) == pytest.approx(expected)
    precision, recall, thresholds = precision_recall_curve(tied)
    np.testing.assert_allclose(thresholds, [0.9, 0.5])
    np.testing.assert_allclose(precision, [1 / 2, 2 / 3])
    np.testing.assert_allclose(recall, [1 / 2, 1])


def test_precision_recall_curve_hand_computed() -> None:
    precision, recall, thresholds = precision_recall_curve(RANKED)
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5, 3 / 6])
    np.testing.assert_allclose(recall, [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 3 / 4])
    assert precision.dtype == recall.dtype == thresholds.dtype == np.float64


def test_recall_at_precision_hand_computed() -> None:
    assert recall_at_precision(RANKED) == (0.25, 0.9)  # only the top prediction is 0.99-precise
    # Precision >= 0.6 at 0.9 (recall 1/4), 0.7 (2/4) and 0.5 (3/5 precise, recall 3/4).
    assert recall_at_precision(RANKED, 0.6) == (0.75, 0.5)
    # Thresholds 0.5 and 0.4 both give recall 3/4 at precision >= 0.5: the higher is returned.
    assert recall_at_precision(RANKED, 0.5) == (0.75, 0.5)
    assert recall_at_precision([neg("n1", "A", 0.9), pos("q1", "B", 0.8, "B")]) == (0.0, None)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="no positive"):
        micro_ap([neg("n1", "A", 0.5)])
    with pytest.raises(ValueError, match="duplicate"):
        micro_ap([pos("q1", "A", 0.9, "A"), pos("q1", "A", 0.8, "A")])
    with pytest.raises(ValueError, match="NaN"):
        micro_ap([pos("q1", "A", math.nan, "A")])


def test_per_edit_recall_hand_computed() -> None:
    predictions = [
        pos("a1", "A", 0.9, "A", edit="a"),
        pos("a2", "B", 0.3, "B", edit="a"),
        pos("b1", "X", 0.95, "C", edit="b"),  # wrong reference: never counts
        pos("b2", "D", 0.8, "D", edit="b"),
        neg("n1", "E", 0.99, edit="a"),
        neg("u1", "F", 0.99, edit="unedited"),  # no positives: not reported
    ]
    assert per_edit_recall(predictions, 0.5) == {"a": 0.5, "b": 0.5}
    assert per_edit_recall(predictions, 0.2) == {"a": 1.0, "b": 0.5}
    assert per_edit_recall(predictions, 0.95) == {"a": 0.0, "b": 0.0}
    assert list(per_edit_recall(predictions, 0.5)) == ["a", "b"]


def test_decisions_per_edit_and_rates() -> None:
    predictions = [
        Prediction("a1", "A", 0.9, "A", "a", "block"),
        Prediction("a2", "B", 0.3, "B", "a", "allow"),
        Prediction("b1", "X", 0.95, "C", "b", "block"),  # blocked, but as the wrong entry
        Prediction("b2", "D", 0.8, "D", "b", "review"),
        Prediction("n1", "E", 0.7, None, "a", "block"),
        Prediction("n2", "F", 0.2, None, "b", "allow"),
        Prediction("n3", "G", 0.6, None, "b", "allow"),
        Prediction("n4", "H", 0.6, None, "b", "review"),
    ]
    assert per_edit_recall_at_decisions(predictions) == {"a": 0.5, "b": 0.5}
    assert per_edit_recall_at_decisions(predictions, {"block"}) == {"a": 0.5, "b": 0.0}
    assert decision_rates(predictions) == {
        "positives": {"allow": 0.25, "block": 0.5, "review": 0.25},
        "negatives": {"allow": 0.5, "block": 0.25, "review": 0.25},
    }
    assert decision_rates(RANKED[:1]) == {"positives": {"none": 1.0}, "negatives": {}}


def _all_positive_queries(
    seed: int, n: int, decimals: int | None
) -> tuple[list[Prediction], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.6
    # Correct predictions score higher on average, so the AP is neither 0 nor 1.
    scores = rng.normal(loc=np.where(correct, 1.0, 0.0), scale=1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)
    predictions = [
        pos(f"q{i}", f"r{i}" if ok else f"wrong{i}", float(s), f"r{i}")
        for i, (ok, s) in enumerate(zip(correct, scores, strict=True))
    ]
    return predictions, correct, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_ap_matches_sklearn_when_every_query_is_positive(seed: int) -> None:
    # One prediction per positive query and distinct scores: sklearn's AP over the predictions
    # averages over the correct ones, µAP over all queries, so µAP = AP * (correct / queries).
    predictions, correct, scores = _all_positive_queries(seed, 300, None)
    assert len(set(scores.tolist())) == len(scores)
    expected = sk.average_precision_score(correct, scores) * correct.sum() / len(correct)
    assert micro_ap(predictions) == pytest.approx(expected, rel=1e-12)


def test_precision_recall_curve_matches_sklearn_with_ties() -> None:
    predictions, correct, scores = _all_positive_queries(3, 400, 1)  # many tied scores
    precision, recall, thresholds = precision_recall_curve(predictions)
    sk_precision, sk_recall, sk_thresholds = sk.precision_recall_curve(correct, scores)
    # sklearn orders thresholds ascending and appends the (precision 1, recall 0) end point.
    np.testing.assert_allclose(thresholds, sk_thresholds[::-1])
    np.testing.assert_allclose(precision, sk_precision[:-1][::-1])
    np.testing.assert_allclose(recall, sk_recall[:-1][::-1] * correct.sum() / len(correct))
    # sklearn's AP credits a tied group with the group's precision; µAP is pessimistic.
    grouped = sk.average_precision_score(correct, scores) * correct.sum() / len(correct)
    assert micro_ap(predictions) < grouped


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_micro_ap_bounds_and_order_invariance(
    rows: list[tuple[int, bool, bool]], shuffler: random.Random
) -> None:
    # Coarse integer scores force ties; the result must not depend on the input order.
    predictions = [
        Prediction(f"q{i}", "r" if hit else "x", float(score), "r" if positive else None, "e")
        for i, (score, positive, hit) in enumerate(rows)
    ]
    if not any(p.true_ref_id for p in predictions):
        return
    value = micro_ap(predictions)
    shuffled = predictions.copy()
    shuffler.shuffle(shuffled)
    assert 0.0 <= value <= 1.0
    assert micro_ap(shuffled) == value
    assert recall_at_precision(shuffled, 0.5) == recall_at_precision(predictions, 0.5)
