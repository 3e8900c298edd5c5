"""Feature-map windows (issue 15): window descriptors pooled from the encoder's last feature
map in the same pass as the global embedding, the entries' paste descriptors, their search as
a candidate source and the ``window_to_paste`` feature. Hermetic: generated arrays and
scikit-image photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from moderation.banks import paste_rows
from moderation.banks.blocklist import Blocklist
from moderation.banks.index import CosineIndex, HammingIndex
from moderation.banks.paste_rows import ENTRY_WINDOW_ROWS, RowIndex, paste_index
from moderation.banks.records import EntryInfo
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.matching.candidates import find_candidates
from moderation.matching.classifier.features import (
    FEATURE_NAMES,
    LEGACY_FEATURE_NAMES,
    LEGACY_FEATURE_SETS,
    QuerySignals,
    RegionLookup,
    query_features,
)
from moderation.matching.classifier.model import CopyModel
from moderation.matching.explain import _region, match_explanation
from moderation.matching.policy import CandidateRules
from moderation.signals.encoders.feature_windows import (
    PASTE_CELLS,
    WINDOW_CELLS,
    grid,
    paste_canvas,
    pool_global,
    pool_windows,
)
from moderation.signals.encoders.lite0_onnx import OnnxLite0Encoder
from moderation.signals.pdq import pdq_hash_dihedral
from tests.conftest import skimage_photo
from tests.unit.test_classifier import DIM, unit
from tests.unit.test_query_windows import feathered_paste

# --- pooling ------------------------------------------------------------------------------------


def test_grid_covers_the_map_flush_with_its_edges() -> None:
    assert len(WINDOW_CELLS) == 25 and set(WINDOW_CELLS) == set(grid(3, 1))
    assert grid(4, 3) == ((0, 0, 4), (0, 3, 4), (3, 0, 4), (3, 3, 4))
    assert grid(3, 2)[-1] == (4, 4, 3)  # the last window ends on the map's last cell
    assert PASTE_CELLS[0] in WINDOW_CELLS  # a paste canvas's entry sits on a query window
    with pytest.raises(ValueError):
        grid(8, 1)


def test_windows_are_the_gem_of_their_cells() -> None:
    rng = np.random.default_rng(0)
    maps = rng.gamma(1.0, 1.0, (2, 8, 7, 7)).astype(np.float32)
    maps[0, 0] = 0.0  # a dead channel stays finite (GeM's clamp)
    pooled = pool_windows(maps, ((1, 2, 3), (0, 0, 7)))
    assert pooled.shape == (2, 2, 8) and np.isfinite(pooled).all()
    direct = (maps[:, :, 1:4, 2:5].clip(1e-6) ** 3).mean(axis=(2, 3)) ** (1 / 3)
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled[:, 0], direct, rtol=1e-5, atol=1e-6)
    # The window over every cell is the global embedding, normalised.
    whole = pool_global(maps)
    np.testing.assert_allclose(
        pooled[:, 1], whole / np.linalg.norm(whole, axis=1, keepdims=True), atol=1e-6
    )
    # Every default window agrees with its direct GeM.
    every = pool_windows(maps)
    top, left, side = WINDOW_CELLS[17]
    direct = (maps[:, :, top : top + side, left : left + side].clip(1e-6) ** 3).mean(axis=(2, 3))
    direct = direct ** (1 / 3) / np.linalg.norm(direct ** (1 / 3), axis=1, keepdims=True)
    np.testing.assert_allclose(every[:, 17], direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not inside"):
        pool_windows(maps, ((5, 5, 3),))


def test_paste_canvas_puts_the_entry_on_its_cells() -> None:
    canvas = np.asarray(paste_canvas(skimage_photo("chelsea")), np.int16)
    assert canvas.shape == (224, 224, 3)
    assert (canvas[:60, :] == 128).all() and (canvas[:, 165:] == 128).all()
    assert np.abs(canvas[70:155, 70:155] - 128).mean() > 20  # the photo, 3 cells of 32 px


# --- the encoder's second output --------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("onnx-cache")
    OnnxLite0Encoder(cache_dir=cache).load()
    return cache


def test_windows_come_from_the_same_pass_as_the_unchanged_embedding(built: Path) -> None:
    import torch

    from moderation.signals.encoders.timm_backend import EfficientNetLite0Encoder

    photos = [skimage_photo(n) for n in ("chelsea", "coffee", "rocket")]
    onnx = OnnxLite0Encoder(cache_dir=built)
    vectors, windows = onnx.encode_inputs_with_windows(onnx.preprocess(photos), batch_size=2)
    np.testing.assert_array_equal(vectors, onnx.encode(photos))
    assert windows.shape == (3, 25, 1280) and windows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(windows, axis=2), 1.0, atol=1e-5)
    eager = EfficientNetLite0Encoder(device=torch.device("cpu"), runtime="eager")
    assert eager.id == onnx.id and eager.has_feature_windows
    eager_vectors, eager_windows = eager.encode_inputs_with_windows(eager.preprocess(photos))
    assert np.sum(eager_vectors * vectors, axis=1).min() >= 0.9999
    assert np.sum(eager_windows * windows, axis=2).min() >= 0.999
    manifest = json.loads(onnx.files.manifest.read_text())
    assert manifest["outputs"] == ["features", "feature_map"]


def test_manifest_without_the_feature_map_output_is_rebuilt(built: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    files = OnnxLite0Encoder(cache_dir=cache).files
    manifest = json.loads(files.manifest.read_text())
    del manifest["outputs"]  # as a model with one output would describe itself
    files.manifest.write_text(json.dumps(manifest))
    OnnxLite0Encoder(cache_dir=cache).load()
    assert json.loads(files.manifest.read_text())["outputs"] == ["features", "feature_map"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "canvas", "scale"), [("chelsea", "grass", 0.3), ("coffee", "gravel", 0.4)]
)
def test_feathered_paste_is_found_by_feature_windows_not_globally(
    built: Path, source: str, canvas: str, scale: float
) -> None:
    names = ["chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "retina"]
    photos = [skimage_photo(n) for n in names]
    encoder = OnnxLite0Encoder(cache_dir=built)
    bank, pastes = encoder.encode(photos), encoder.encode_paste_descriptors(photos)
    query = feathered_paste(skimage_photo(source), skimage_photo(canvas), scale)
    vectors, windows = encoder.encode_inputs_with_windows(encoder.preprocess([query]))
    own = names.index(source)
    assert vectors[0] @ bank[own] < 0.50  # below the default policy's min_cosine
    # Windows against the entries' global vectors do no better (the scale differs) ...
    assert (windows[0] @ bank[own]).max() < 0.50
    # ... against their paste descriptors they find it, clear of the other entries.
    best = (windows[0] @ pastes.T).max(axis=0)
    assert int(best.argmax()) == own
    assert best[own] >= CandidateRules().min_window_cosine
    assert best[own] - np.delete(best, own).max() >= 0.10
    # Through stage 1: a candidate only thanks to the windows.
    blocklist = blocklist_of(bank, {i + 1: with_paste(pastes[i]) for i in range(len(names))})
    rules, pdq = CandidateRules(), (pdq_hash_dihedral(query),)
    assert not find_candidates(blocklist, rules, vectors, pdq)
    found = find_candidates(
        blocklist, rules, vectors, pdq, windows=windows, window_index=paste_index(blocklist)
    )
    assert [c.entry.entry_id for c in found] == [own + 1]
    assert found[0].window_cosine == pytest.approx(best[own], abs=1e-5)
    assert found[0].cosine == pytest.approx(float(vectors[0] @ bank[own]), abs=1e-5)


# --- the paste index and the feature -----------------------------------------------------------


def with_paste(paste: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Region rows of an entry: five windows (here: copies of the paste, negated) and then its
    paste descriptor."""
    return np.concatenate([np.tile(-paste, (ENTRY_WINDOW_ROWS, 1)), paste[None]])


def blocklist_of(
    vectors: npt.NDArray[np.float32],
    regions: dict[int, npt.NDArray[np.float32]],
    pdq: dict[int, tuple[bytes, int]] | None = None,
) -> Blocklist:
    """Entries 1..n with ``vectors`` and ``regions`` (dim from the vectors); PDQ (digest,
    quality) from ``pdq``, else none (quality 0)."""
    ids = list(range(1, len(vectors) + 1))
    payload = Payload.empty("test-encoder", vectors.shape[1]).with_added(
        [
            EntrySignals(eid, vectors[i], *(pdq or {}).get(eid, (b"\0" * 32, 0)), regions.get(eid))
            for i, eid in enumerate(ids)
        ]
    )
    return Blocklist(
        version=1,
        snapshot_id=None,
        encoder_id="test-encoder",
        entries={eid: EntryInfo(eid, 1, "bank", "block", "default", f"e{eid}") for eid in ids},
        cosine=CosineIndex.build(np.array(ids), payload.vectors),
        pdq=HammingIndex.build(np.array(ids), payload.pdq),
        payload=payload,
    )


def test_paste_index_holds_the_row_after_the_windows_of_entries_that_have_one() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(3, DIM)))
    pastes = unit(rng.normal(size=(3, DIM)))
    old = unit(rng.normal(size=(ENTRY_WINDOW_ROWS, DIM)))  # imported before: windows only
    blocklist = blocklist_of(vectors, {1: with_paste(pastes[0]), 2: old, 3: with_paste(pastes[2])})
    index = paste_index(blocklist)
    assert index is paste_index(blocklist)  # built once per version
    assert index.ids.tolist() == [1, 3]
    np.testing.assert_allclose(index.vectors, pastes[[0, 2]], atol=2e-3)
    hits = index.search(np.stack([pastes[2], -pastes[2]]), 2, 0.9)
    assert [h.id for h in hits[0]] == [3] and hits[0][0].score == pytest.approx(1.0, abs=2e-3)
    assert hits[1] == []
    # The entry windows the other features read leave the paste descriptor out.
    regions = RegionLookup(blocklist)
    assert len(regions(1)) == ENTRY_WINDOW_ROWS and len(regions(2)) == ENTRY_WINDOW_ROWS
    np.testing.assert_allclose(regions.paste(1)[0], pastes[0], atol=2e-3)
    assert regions.paste(2).shape == (0, DIM)
    assert len(RowIndex(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))) == 0


def test_a_blocklist_past_the_exhaustive_limit_gets_no_paste_index(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(3, DIM)))
    pastes = unit(rng.normal(size=(3, DIM)))
    regions = {eid: with_paste(pastes[eid - 1]) for eid in (1, 2, 3)}
    monkeypatch.setattr(paste_rows, "PASTE_INDEX_MAX_ENTRIES", 2)
    index = paste_index(blocklist_of(vectors, regions))
    assert len(index) == 0 and index.search(pastes[:1], 3, -1.0) == [[]]
    assert "more than the 2 whose paste descriptors" in caplog.text
    monkeypatch.setattr(paste_rows, "PASTE_INDEX_MAX_ENTRIES", 3)
    assert paste_index(blocklist_of(vectors, regions)).ids.tolist() == [1, 2, 3]


def test_window_to_paste_is_the_best_window_and_never_below_cosine() -> None:
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(2, DIM)))
    pastes = unit(rng.normal(size=(2, DIM)))
    blocklist = blocklist_of(vectors, {1: with_paste(pastes[0])})
    regions = RegionLookup(blocklist)
    query = unit(vectors[1] + 0.2 * vectors[0])[None]
    windows = unit(np.stack([pastes[0] + 0.2 * rng.normal(size=DIM), rng.normal(size=DIM)]))
    background = np.zeros((0, DIM), np.float32)
    pdq = (pdq_hash_dihedral(skimage_photo("coffee")),)
    with_windows = QuerySignals(query, pdq, windows=windows)
    rows = query_features(with_windows, [1, 2], blocklist, regions, background=background)
    # (region rows are stored at reduced precision)
    assert rows[0]["window_to_paste"] == pytest.approx(float(np.max(windows @ pastes[0])), abs=2e-3)
    assert rows[0]["window_to_paste"] > rows[0]["cosine"]
    assert rows[1]["window_to_paste"] == rows[1]["cosine"]  # entry 2 has no paste descriptor
    plain = query_features(QuerySignals(query, pdq), [1], blocklist, regions, background=background)
    assert plain[0]["window_to_paste"] == plain[0]["cosine"]
    # Every other feature is what it was without the windows.
    assert {k: v for k, v in rows[0].items() if k != "window_to_paste"} == {
        k: v for k, v in plain[0].items() if k != "window_to_paste"
    }


@pytest.mark.parametrize("legacy", LEGACY_FEATURE_SETS)
def test_a_model_stored_before_the_windows_still_loads_and_predicts_alike(
    legacy: tuple[str, ...],
) -> None:
    """Models before the feature-map windows (8 features) and before local features (9)."""
    rng = np.random.default_rng(3)
    k = len(legacy)
    assert FEATURE_NAMES[:k] == legacy and len(FEATURE_NAMES) > k
    assert LEGACY_FEATURE_NAMES in LEGACY_FEATURE_SETS
    doc = {
        "format": 1,
        "kind": "logistic-platt",
        "version": "lr-legacy",
        "encoder_id": "test-encoder",
        "feature_names": list(legacy),
        "mean": [0.5] * k,
        "scale": [0.2] * k,
        "coef": rng.normal(size=k).tolist(),
        "intercept": 0.1,
        "platt": {"a": 1.5, "b": -0.2},
        "background": {"dtype": "float32", "shape": [0, DIM], "b64": ""},
    }
    model = CopyModel.from_json(doc)
    rows = rng.uniform(size=(4, len(FEATURE_NAMES)))
    np.testing.assert_allclose(model.predict(rows), model.predict(rows[:, :k]))
    rows[:, k:] = 1.0  # the new columns are not read by the old model
    np.testing.assert_allclose(model.predict(rows), model.predict(rows[:, :k]))
    with pytest.raises(ValueError):
        model.predict(rows[:, :3])


def test_a_window_match_is_explained_as_feature_window_evidence() -> None:

    features = dict.fromkeys(LEGACY_FEATURE_NAMES, 0.41)
    features["window_to_paste"] = 0.72
    record = {"agreed": ["feature_window", "classifier"], "region": _region(features)}
    region = match_explanation(record, cosine=0.41, pdq_distance=None, probability=0.9)
    assert region["signals"]["region_cosine"] == {
        "kind": "feature_window",
        "value": 0.72,
        "agreed": True,
    }
    # Below the global cosine it is no evidence.
    assert _region({**features, "window_to_paste": 0.41}) is None
