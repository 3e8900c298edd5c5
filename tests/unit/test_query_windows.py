"""Query windows of the classifier stage: the grid's geometry, the window band, that the stage
embeds windows only for queries in that band, and that a feathered paste (no straight edge) of a
bank photo is found by the windows where the global embedding misses it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageFilter

from moderation.banks.records import EntryInfo
from moderation.matching.candidates import Candidate, QueryContext
from moderation.matching.classifier.model import CopyModel, fit_model
from moderation.matching.classifier.regions import (
    WINDOW_CENTRE,
    find_pasted_rectangles,
    query_windows,
    window_boxes,
)
from moderation.matching.classifier.stage import ClassifierStage, WindowBand
from moderation.signals.pdq import pdq_hash, pdq_hash_dihedral
from tests.conftest import skimage_photo
from tests.unit.test_classifier import DIM, make_blocklist, synthetic_pairs, unit


def test_window_grid_geometry() -> None:
    boxes = window_boxes()
    assert len(boxes) == 9 + 4 + 1
    for left, top, right, bottom in boxes:
        assert 0.0 <= left < right <= 1.0 + 1e-9 and 0.0 <= top < bottom <= 1.0 + 1e-9
        assert right - left == pytest.approx(bottom - top)
    thirds = boxes[:9]
    assert {round(b[0], 6) for b in thirds} == {0.0, round(1 / 3, 6), round(2 / 3, 6)}
    assert all(b[2] - b[0] == pytest.approx(1 / 3) for b in thirds)
    # The 2 x 2 halves cover the corners; the centre half-window is added once.
    halves = boxes[9:13]
    assert (0.0, 0.0, 0.5, 0.5) in halves and (0.5, 0.5, 1.0, 1.0) in halves
    assert boxes[-1] == WINDOW_CENTRE and boxes.count(WINDOW_CENTRE) == 1
    # Overlap when side * positions > 1: three half-windows start at 0, 0.25, 0.5.
    overlapping = window_boxes(((0.5, 3),))
    assert sorted({b[0] for b in overlapping}) == [0.0, 0.25, 0.5]
    assert WINDOW_CENTRE in overlapping and len(overlapping) == 9
    with pytest.raises(ValueError):
        window_boxes(((1.5, 2),))
    crops = query_windows(Image.new("RGB", (300, 240)))
    assert [c.size for c in crops[:2]] == [(100, 80), (100, 80)]
    assert crops[-1].size == (150, 120)


def test_window_band() -> None:
    band = WindowBand(low=0.6, high=0.78, certain_pdq=16, enabled=True)
    assert band.contains(0.65, None) and band.contains(0.6, 40)
    assert not band.contains(0.59, None) and not band.contains(0.78, None)
    assert not band.contains(0.65, 10)  # a PDQ match decides
    assert not WindowBand().contains(0.65, None)  # off by default


class CountingEncoder:
    """Stands in for the encoder: unit random vectors, and how many images each call got."""

    dim = DIM

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._rng = np.random.default_rng(3)

    def encode(
        self, images: Sequence[Image.Image], batch_size: int = 32
    ) -> npt.NDArray[np.float32]:
        self.calls.append(len(images))
        return unit(self._rng.normal(size=(len(images), DIM)))


def small_model() -> CopyModel:
    """A model fitted on synthetic pairs: any model will do where a test counts views."""
    x, y = synthetic_pairs(400, 1)
    return fit_model(
        x[:300], y[:300], calibration=(x[300:], y[300:]), encoder_id="test-encoder",
        background=np.zeros((0, DIM), np.float32),
    )  # fmt: skip


def test_stage_embeds_windows_only_in_the_window_band() -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(2, DIM)))
    photo = skimage_photo("grass")
    pdqs = [(pdq_hash(photo).digest, pdq_hash(photo).quality)] * 2
    windows = {1: unit(rng.normal(size=(5, DIM))), 2: unit(rng.normal(size=(5, DIM)))}
    blocklist = make_blocklist(vectors, windows, pdqs)
    model = small_model()
    encoder = CountingEncoder()
    stage = ClassifierStage(model, encoder, windows=WindowBand(enabled=True))  # type: ignore[arg-type]
    entry = blocklist.entries[1]
    assert isinstance(entry, EntryInfo)
    frame = skimage_photo("coffee")  # no straight-edged rectangle, no mosaic: no detected view
    context = QueryContext((frame,), vectors[:1], (pdq_hash_dihedral(frame),))
    cosines = {"below": 0.55, "in_band": 0.7, "above": 0.9}
    items = [(context, [Candidate(entry, cosine=c)]) for c in cosines.values()]
    stage.refine_batch(items, blocklist)
    counts = {name: items[i][1][0].features["windows"] for i, name in enumerate(cosines)}
    assert counts == {"below": 0.0, "in_band": float(len(window_boxes())), "above": 0.0}
    assert encoder.calls == [len(window_boxes())]  # one batch for the whole screening batch
    assert all(cands[0].probability is not None for _, cands in items)
    off = ClassifierStage(model, CountingEncoder())  # type: ignore[arg-type]
    quiet = [(context, [Candidate(entry, cosine=0.7)])]
    off.refine_batch(quiet, blocklist)
    assert quiet[0][1][0].features["windows"] == 0.0


def test_a_query_verified_by_local_features_gets_no_views() -> None:
    """Local features (``QueryContext.local`` set, even to nothing found) replace the views:
    the same mosaic query in the uncertain band embeds its demosaiced view only when its
    keypoints were not verified; the band's rule is the one training pairs follow too."""
    from moderation.matching.classifier.stage import Band
    from moderation.matching.explain import match_evidence
    from moderation.matching.policy import CategoryRules
    from moderation.media.edits import apply_edit

    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(2, DIM)))
    mosaic = apply_edit("pixelize", skimage_photo("chelsea"), seed=0)
    pdqs = [(pdq_hash(mosaic).digest, pdq_hash(mosaic).quality)] * 2
    blocklist = make_blocklist(vectors, {1: unit(rng.normal(size=(5, DIM)))}, pdqs)
    model = small_model()
    encoder = CountingEncoder()
    stage = ClassifierStage(model, encoder, local_features=True)  # type: ignore[arg-type]
    entry = blocklist.entries[1]
    assert isinstance(entry, EntryInfo)
    rules = CategoryRules(block_cosine=0.78, review_cosine=0.7)
    views, inliers, agreed = {}, {}, {}
    for name, local in (("not verified", None), ("verified", {}), ("inliers", {1: 40})):
        context = QueryContext((mosaic,), vectors[:1], (pdq_hash_dihedral(mosaic),), local=local)
        items = [(context, [Candidate(entry, cosine=0.6, pdq_distance=200)])]
        stage.refine_batch(items, blocklist)
        cand = items[0][1][0]
        views[name], inliers[name] = cand.features["views"], cand.features.get("inliers")
        agreed[name] = "local_features" in cand.signals
        evidence = match_evidence(rules, cand, "classifier")
        assert evidence.get("local_inliers") == (None if local is None else int(inliers[name]))
    assert views == {"not verified": 1.0, "verified": 0.0, "inliers": 0.0}
    assert inliers == {"not verified": None, "verified": 0.0, "inliers": 40.0}
    assert agreed == {"not verified": False, "verified": False, "inliers": True}
    assert encoder.calls == [1]
    assert Band().uncertain(0.6, None) and not Band().uncertain(0.6, None, verified_locally=True)


def feathered_paste(photo: Image.Image, canvas: Image.Image, scale: float) -> Image.Image:
    """``photo`` at ``scale`` of the canvas width, centred, through a blurred ellipse mask: no
    straight edge anywhere."""
    width = int(canvas.width * scale)
    height = int(width * photo.height / photo.width)
    small = photo.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, width - 1, height - 1), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(width / 12))
    out = canvas.convert("RGB").copy()
    out.paste(small, ((canvas.width - width) // 2, (canvas.height - height) // 2), mask)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("source", "canvas"), [("chelsea", "grass"), ("coffee", "gravel")])
def test_feathered_paste_is_found_by_windows_not_globally(
    source: str, canvas: str, tmp_path: Path
) -> None:
    from moderation.signals.encoders import create_encoder

    encoder = create_encoder("timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path)
    names = ["chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "retina"]
    bank = encoder.encode([skimage_photo(n) for n in names])
    query = feathered_paste(skimage_photo(source), skimage_photo(canvas), 0.3)
    assert find_pasted_rectangles(query) == []  # nothing for the straight-edge detector
    own = names.index(source)
    global_cosine = encoder.encode([query])[0] @ bank.T
    # Not even a candidate for the global embedding (the default policy's min_cosine is 0.50).
    assert global_cosine[own] < 0.50
    windows = encoder.encode(query_windows(query)) @ bank.T  # (windows, entries)
    best = windows.max(axis=0)
    assert int(best.argmax()) == own
    assert best[own] >= 0.62 and best[own] - np.delete(best, own).max() >= 0.10
