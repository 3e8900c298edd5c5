"""The canary's SLO judgement and the drift statistics, on known numbers (no screening)."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.matching.policy import parse_policy
from moderation.modelops.canary import CanaryReport, SloViolation, check_slo, slo_failures
from moderation.modelops.drift import MIN_SAMPLES, categorical_drift, ks_drift

POLICY = {
    "name": "p",
    "categories": {"default": {"block_cosine": 0.8, "review_cosine": 0.7}},
}


def report(recall_review: float, fpr: float, recall_block: float = 0.9) -> CanaryReport:
    return CanaryReport(
        micro_ap=0.9,
        recall_block=recall_block,
        recall_review=recall_review,
        false_positive_rate=fpr,
        pairs=100,
        seconds=1.0,
        passed_slo=True,
        positives=50,
        negatives=50,
        slo={"min_recall": 0.95, "min_block_recall": None, "max_false_positive_rate": 0.02},
    )


def test_slo_defaults_and_failures_name_the_figures() -> None:
    policy = parse_policy(POLICY, source="test")
    assert policy.slo.min_recall == 0.95 and policy.slo.max_false_positive_rate == 0.02
    check_slo(report(0.95, 0.02), policy)  # exactly at the objectives passes
    with pytest.raises(SloViolation) as caught:
        check_slo(report(0.9, 0.05), policy)
    message = str(caught.value)
    assert "recall at review 0.9000 < min_recall 0.95" in message
    assert "false-positive rate 0.0500 > max_false_positive_rate 0.02" in message
    assert caught.value.report is not None
    strict = parse_policy({**POLICY, "slo": {"min_block_recall": 0.95}}, source="test")
    assert slo_failures(strict, 1.0, 0.9, 0.0) == ["recall at block 0.9000 < min_block_recall 0.95"]
    assert slo_failures(strict, None, None, None) == []  # nothing measured, nothing failed


def test_ks_drift_is_zero_for_the_same_sample_and_one_for_disjoint_ones() -> None:
    rng = np.random.default_rng(0)
    same = list(rng.uniform(0.3, 0.6, 200))
    assert ks_drift("score", same, same).score == 0.0
    far = ks_drift("score", list(rng.uniform(0.8, 0.9, 200)), same)
    assert far.score == 1.0 and far.drifted
    stable = ks_drift("score", list(rng.uniform(0.3, 0.6, 200)), same)
    assert not stable.drifted
    few = ks_drift("score", same[: MIN_SAMPLES - 1], same)
    assert few.score == 0.0 and few.details["insufficient"]


def test_cramers_v_of_decision_rates() -> None:
    reference = ["allow"] * 90 + ["block/default/b"] * 10
    assert categorical_drift("decision_rates", list(reference), reference).score == 0.0
    flood = ["allow"] * 40 + ["block/default/b"] * 60
    shifted = categorical_drift("decision_rates", flood, reference)
    # [[40, 60], [90, 10]]: expected 65 / 35 per row, chi2 = 2 (25^2/65 + 25^2/35) = 54.95,
    # n = 200, V = sqrt(54.95 / 200) = 0.524.
    assert shifted.score == pytest.approx(0.524, abs=1e-3) and shifted.drifted
    assert shifted.details["moved"]["block/default/b"] == {"current": 0.6, "reference": 0.1}
    one_kind = categorical_drift("decision_rates", ["allow"] * 50, ["allow"] * 50)
    assert one_kind.score == 0.0
