"""The classifier stage's parts without an encoder: regions, pair features, the model, its
calibration and serialisation, and the activation rule. Hermetic: generated vectors, generated
images and scikit-image photos."""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageFilter

from moderation.banks.blocklist import Blocklist
from moderation.banks.index import CosineIndex, HammingIndex
from moderation.banks.records import EntryInfo
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.benchmark.protocol import query_seed
from moderation.matching.classifier.features import (
    FEATURE_NAMES,
    QuerySignals,
    RegionLookup,
    feature_matrix,
    query_features,
)
from moderation.matching.classifier.model import (
    CopyModel,
    ModelFormatError,
    evaluate,
    expected_calibration_error,
    fit_model,
    reliability_curve,
)
from moderation.matching.classifier.regions import (
    ENTRY_WINDOWS,
    crop,
    demosaic,
    find_pasted_rectangles,
    mosaic_block,
    query_views,
)
from moderation.matching.classifier.stage import Band, agreed_signals
from moderation.matching.classifier.synthetic import edits_for, training_copy
from moderation.matching.classifier.training import decide_activation
from moderation.media.edits import EDITS, apply_edit
from moderation.media.implementations import TUNING
from moderation.signals.pdq import hamming_distance, pdq_hash, pdq_hash_dihedral
from tests.conftest import skimage_photo

DIM = 16


def unit(v: npt.ArrayLike) -> npt.NDArray[np.float32]:
    a = np.asarray(v, np.float32)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def make_blocklist(
    vectors: npt.NDArray[np.float32],
    regions: dict[int, npt.NDArray[np.float32]],
    pdqs: list[tuple[bytes, int]],
) -> Blocklist:
    ids = list(range(1, len(vectors) + 1))
    payload = Payload.empty("test-encoder", DIM).with_added(
        [
            EntrySignals(eid, vectors[i], pdqs[i][0], pdqs[i][1], regions.get(eid))
            for i, eid in enumerate(ids)
        ]
    )
    infos = {eid: EntryInfo(eid, 1, "bank", "block", "default", f"e{eid}") for eid in ids}
    return Blocklist(
        version=1,
        snapshot_id=None,
        encoder_id="test-encoder",
        entries=infos,
        cosine=CosineIndex.build(np.array(ids), payload.vectors),
        pdq=HammingIndex.build(np.array(ids), payload.pdq),
        payload=payload,
    )


# --- regions ----------------------------------------------------------------------------------


def test_entry_windows_are_overlapping_quadrants_and_centre() -> None:
    image = Image.new("RGB", (200, 100))
    sizes = [crop(image, box).size for _, box in ENTRY_WINDOWS]
    assert sizes == [(120, 60)] * 5
    assert [name for name, _ in ENTRY_WINDOWS][-1] == "centre"


def test_pasted_photo_is_found_on_a_flat_canvas_and_on_another_photo() -> None:
    photo = skimage_photo("astronaut").resize((240, 240))
    canvas = Image.new("RGB", (500, 700), (245, 245, 245))
    canvas.paste(photo, (130, 200))
    found = find_pasted_rectangles(canvas)
    assert found, "no rectangle found around a photo pasted on a flat canvas"
    left, top, right, bottom = found[0].box
    assert abs(left - 130 / 500) < 0.03 and abs(top - 200 / 700) < 0.03
    assert abs(right - 370 / 500) < 0.03 and abs(bottom - 440 / 700) < 0.03
    # The benchmark's overlay edit: the photo at 60% on another photo.
    overlay = apply_edit(
        "overlay_bg_60", skimage_photo("coffee"), seed=3, background=skimage_photo("rocket")
    )
    assert find_pasted_rectangles(overlay), "overlay_bg_60 paste not found"


def test_plain_photo_and_blur_have_no_views_but_a_mosaic_does() -> None:
    photo = skimage_photo("chelsea")
    assert mosaic_block(photo) is None
    assert mosaic_block(photo.filter(ImageFilter.GaussianBlur(3))) is None
    mosaic = apply_edit("pixelize", photo, seed=0)
    block = mosaic_block(mosaic)
    assert block is not None and 7 <= block <= 13  # the edit keeps 10% of each side
    assert [name for name, _ in query_views(mosaic)] == ["demosaic"]
    restored = np.asarray(demosaic(mosaic, block), np.float32)
    original = np.asarray(photo, np.float32)
    # Undoing the mosaic brings the pixels closer to the original than the mosaic was.
    assert np.abs(restored - original).mean() < np.abs(np.asarray(mosaic) - original).mean()


# --- features ---------------------------------------------------------------------------------


def test_pair_features_follow_their_definitions() -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(3, DIM)))
    windows = unit(rng.normal(size=(5, DIM)))
    photo = skimage_photo("coffee")
    other = skimage_photo("rocket")
    pdqs = [
        (pdq_hash(photo).digest, pdq_hash(photo).quality),
        (pdq_hash(other).digest, pdq_hash(other).quality),
        (pdq_hash(other).digest, 10),  # low quality: PDQ must not count
    ]
    blocklist = make_blocklist(vectors, {1: windows}, pdqs)
    regions = RegionLookup(blocklist)
    assert np.array_equal(regions(1), windows) and regions(2).shape == (0, DIM)
    # The query: close to window 2 of entry 1; one view close to entry 1's global vector.
    query_vec = unit(windows[2] + 0.1 * rng.normal(size=DIM))[None, :]
    view = unit(vectors[0] + 0.05 * rng.normal(size=DIM))[None, :]
    background = unit(rng.normal(size=(6, DIM)))
    query = QuerySignals(query_vec, (pdq_hash_dihedral(photo.transpose(0)),), view)
    rows = query_features(query, [1, 2, 3], blocklist, regions, background=background)
    first = rows[0]
    cosine = float(query_vec[0] @ vectors[0])
    assert first["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert first["global_to_region"] == pytest.approx(float(query_vec[0] @ windows[2]), abs=1e-6)
    assert first["region_to_global"] == pytest.approx(float(view[0] @ vectors[0]), abs=1e-6)
    assert first["region_to_region"] >= max(first["region_to_global"], first["global_to_region"])
    # A flipped copy: the smallest distance over the dihedral variants counts.
    flipped = pdq_hash_dihedral(photo.transpose(0))
    distance = min(hamming_distance(v.digest, pdqs[0][0]) for v in flipped)
    assert distance < 31 < hamming_distance(flipped[0].digest, pdqs[0][0])
    assert first["pdq_similarity"] == pytest.approx(1 - distance / 128)
    assert rows[2]["pdq_similarity"] == 0.0 and rows[2]["pdq_quality"] == pytest.approx(0.10)
    top3 = np.sort(query_vec[0] @ background.T)[-3:].mean()
    assert first["background_norm"] == pytest.approx(cosine - top3, abs=1e-6)
    # Margin: the pair's best cosine feature minus the best global cosine of another entry.
    others = max(float(query_vec[0] @ vectors[1]), float(query_vec[0] @ vectors[2]))
    best = max(first["cosine"], first["region_to_global"], first["global_to_region"])
    assert first["margin"] == pytest.approx(best - others, abs=1e-6)
    # Outside the uncertain band the views do not count; leaving entry 1 out changes margins.
    quiet = query_features(query, [1], blocklist, regions, background=background, use_views=False)
    assert quiet[0]["region_to_global"] == pytest.approx(cosine, abs=1e-6)
    without = query_features(
        query, [2], blocklist, regions, background=background, exclude=[1], use_views=False
    )
    assert without[0]["margin"] == pytest.approx(
        float(query_vec[0] @ vectors[1]) - float(query_vec[0] @ vectors[2]), abs=1e-6
    )
    assert feature_matrix(rows).shape == (3, len(FEATURE_NAMES))
    assert "entry_region" in agreed_signals({**first, "global_to_region": 0.9, "cosine": 0.5})


def test_band_skips_clear_copies_and_clear_misses() -> None:
    band = Band(low=0.45, high=0.85, certain_pdq=16)
    assert band.uncertain(0.6, None)
    assert not band.uncertain(0.9, None) and not band.uncertain(0.3, None)
    assert not band.uncertain(0.6, 10)


# --- model, calibration, serialisation ----------------------------------------------------------


def synthetic_pairs(n: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Pairs drawn from a known logistic model, so calibrated probabilities are knowable."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    logit = 2.0 * x[:, 0] + 1.5 * x[:, 1] - 1.0 * x[:, 4] - 1.0
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return x, y


def test_fitted_model_is_calibrated_on_fresh_pairs() -> None:
    x, y = synthetic_pairs(6000, 1)
    cx, cy = synthetic_pairs(2000, 2)
    model = fit_model(
        x, y, calibration=(cx, cy), encoder_id="enc", background=np.zeros((0, DIM), np.float32)
    )
    tx, ty = synthetic_pairs(4000, 3)
    p = model.predict(tx)
    points = reliability_curve(p, ty, bins=10)
    # Balanced class weights skew the raw regression; Platt scaling brings it back.
    assert expected_calibration_error(points) < 0.04, points
    raw = 1.0 / (1.0 + np.exp(-model.logit(tx)))
    assert expected_calibration_error(reliability_curve(raw, ty)) > expected_calibration_error(
        points
    )
    figures = evaluate(p, ty)
    assert figures["average_precision"] > 0.8 and figures["copies"] == int(ty.sum())


def test_model_round_trips_through_json_without_pickle() -> None:
    x, y = synthetic_pairs(800, 4)
    background = unit(np.random.default_rng(5).normal(size=(4, DIM)))
    model = fit_model(
        x[:600], y[:600], calibration=(x[600:], y[600:]), encoder_id="enc", background=background
    )
    text = model.dumps()
    document = json.loads(text)  # plain JSON: nothing executable in it
    assert document["format"] == 1 and document["feature_names"] == list(FEATURE_NAMES)
    assert model.version.startswith("lr-")
    again = CopyModel.loads(text)
    assert np.array_equal(again.predict(x), model.predict(x))
    assert np.array_equal(again.background, background)
    for broken in (
        {**document, "format": 2},
        {**document, "feature_names": ["cosine"]},
        {**document, "coef": document["coef"][:-1]},
        {**document, "scale": [0.0] * len(document["scale"])},
    ):
        with pytest.raises(ModelFormatError):
            CopyModel.from_json(broken)


def test_a_worse_model_is_not_activated() -> None:
    good = {"average_precision": 0.95}
    assert decide_activation(None, good) == (True, "no active model")
    activated, reason = decide_activation(good, {"average_precision": 0.90})
    assert not activated and "0.9000" in reason and "0.9500" in reason
    assert decide_activation(good, {"average_precision": 0.95})[0]


# --- training copies ----------------------------------------------------------------------------


def test_training_copies_differ_from_the_evaluation_queries() -> None:
    photo = skimage_photo("astronaut").resize((200, 200))
    background = skimage_photo("coffee")
    for edit in EDITS:
        evaluation = apply_edit(edit, photo, seed=query_seed(0, edit, 0), background=background)
        training = training_copy(edit, photo, 12345, background)
        same_size = training.size == evaluation.size
        assert not (same_size and np.array_equal(np.asarray(training), np.asarray(evaluation))), (
            f"{edit}: the training copy equals the benchmark's query"
        )
    counts: dict[str, int] = {}
    for i in range(len(TUNING)):
        for edit in edits_for(i, 2):
            counts[edit] = counts.get(edit, 0) + 1
    # Round robin over the tuning implementations (the benchmark's edits among them), never an
    # unseen one.
    assert set(counts) == set(TUNING) and max(counts.values()) - min(counts.values()) <= 1
