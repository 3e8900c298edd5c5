"""The copy model's hinge terms: a piecewise-linear response per feature (issue 15).

A linear model extrapolates weak evidence (an unrelated photo's PDQ distance of 96 bits, a
window cosine of 0.56) linearly from strong evidence; the hinge terms let the response stay flat
below a knot. Hermetic: generated feature rows with a known response, no encoder.
"""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt
import pytest

from moderation.matching.classifier.features import FEATURE_NAMES, LEGACY_FEATURE_NAMES
from moderation.matching.classifier.model import (
    HINGE_KNOTS,
    CopyModel,
    ModelFormatError,
    fit_model,
    hinge_basis,
    knot_list,
)

NO_BACKGROUND = np.zeros((0, 8), np.float32)
COSINE = FEATURE_NAMES.index("cosine")
PDQ = FEATURE_NAMES.index("pdq_similarity")


def true_probability(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A copy probability that only rises above a cosine of 0.7 or a PDQ similarity of 0.5
    (distance 64 bits): below those, the signals carry no copy evidence."""
    logit = 25.0 * np.maximum(0.0, x[:, COSINE] - 0.7) + 20.0 * np.maximum(0.0, x[:, PDQ] - 0.5)
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-(logit - 3.0)))
    return out


def pairs(n: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Feature rows (every feature uniform in [0, 1]) labelled from :func:`true_probability`."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, len(FEATURE_NAMES)))
    return x, rng.random(n) < true_probability(x)


def fitted(knots: dict[str, tuple[float, ...]] | None) -> CopyModel:
    x, y = pairs(8000, 1)
    cx, cy = pairs(4000, 2)
    return fit_model(
        x, y, calibration=(cx, cy), encoder_id="enc", background=NO_BACKGROUND, knots=knots
    )


def test_hinge_basis_appends_one_clipped_column_per_knot() -> None:
    x = np.zeros((2, len(FEATURE_NAMES)))
    x[:, COSINE] = (0.55, 0.95)
    x[:, PDQ] = (0.9, 0.1)
    knots = (("cosine", 0.5), ("cosine", 0.9), ("pdq_similarity", 0.5))
    basis = hinge_basis(x, FEATURE_NAMES, knots)
    assert basis.shape == (2, len(FEATURE_NAMES) + 3)
    assert np.array_equal(basis[:, : len(FEATURE_NAMES)], x)
    np.testing.assert_allclose(basis[:, -3:], [[0.05, 0.0, 0.4], [0.45, 0.05, 0.0]], atol=1e-12)
    assert hinge_basis(x, FEATURE_NAMES, ()).shape == x.shape
    with pytest.raises(KeyError):
        hinge_basis(x, LEGACY_FEATURE_NAMES, (("window_to_paste", 0.6),))
    pairs_ = knot_list(HINGE_KNOTS)
    assert len(pairs_) == sum(len(v) for v in HINGE_KNOTS.values())
    assert [FEATURE_NAMES.index(n) for n, _ in pairs_] == sorted(
        FEATURE_NAMES.index(n) for n, _ in pairs_
    )


def test_weak_evidence_is_not_extrapolated_from_strong_evidence() -> None:
    linear, hinged = fitted({}), fitted(None)
    assert linear.knots == () and len(hinged.knots) == len(knot_list(HINGE_KNOTS))
    x, _ = pairs(6000, 3)
    truth = true_probability(x)
    linear_error = float(np.abs(linear.predict(x) - truth).mean())
    hinged_error = float(np.abs(hinged.predict(x) - truth).mean())
    assert hinged_error < 0.03 < linear_error, (hinged_error, linear_error)
    # Weak evidence on both signals (cosine 0.65, PDQ distance 83 bits): about 5% copies.
    weak = np.full((1, len(FEATURE_NAMES)), 0.5)
    weak[0, COSINE], weak[0, PDQ] = 0.65, 0.35
    assert float(true_probability(weak)[0]) < 0.05
    assert float(hinged.predict(weak)[0]) < 0.1 < float(linear.predict(weak)[0])


def test_knots_round_trip_and_models_without_them_still_load() -> None:
    model = fitted(None)
    document = json.loads(model.dumps())
    assert document["knots"][0] == ["cosine", 0.5]
    assert len(document["coef"]) == len(FEATURE_NAMES) + len(document["knots"])
    x, _ = pairs(200, 4)
    again = CopyModel.loads(model.dumps())
    assert again.knots == model.knots
    assert np.array_equal(again.predict(x), model.predict(x))
    for broken in (
        {**document, "knots": [["no_such_feature", 0.5], *document["knots"][1:]]},
        {**document, "knots": [["cosine", float("nan")], *document["knots"][1:]]},
        {**document, "knots": document["knots"][1:]},  # one coefficient too many
    ):
        with pytest.raises(ModelFormatError):
            CopyModel.from_json(broken)
    # A model stored before the hinge terms (no "knots" key) reads its features as they are.
    old = {k: v for k, v in json.loads(fitted({}).dumps()).items() if k != "knots"}
    loaded = CopyModel.from_json(old)
    assert loaded.knots == ()
    logit = ((x - loaded.mean) / loaded.scale) @ loaded.coef + loaded.intercept
    expected = 1.0 / (1.0 + np.exp(-(loaded.platt_a * logit + loaded.platt_b)))
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-12)
