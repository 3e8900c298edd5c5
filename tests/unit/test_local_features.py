"""Local features (issue 15): SIFT keypoints of bank entries, a descriptor index and RANSAC
verification find a photo pasted small, rotated and feathered onto another photo, or as one
collage tile, and no unrelated photo. Hermetic: scikit-image photos and generated images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from skimage import data

from moderation.banks import keypoint_rows
from moderation.banks.blocklist import Blocklist
from moderation.banks.keypoint_rows import local_index
from moderation.banks.paste_rows import ENTRY_WINDOW_ROWS, VersionCache
from moderation.matching.candidates import Scope, merge_verified
from moderation.matching.classifier.features import (
    LOCAL_INLIER_CAP,
    QuerySignals,
    RegionLookup,
    local_inliers,
)
from moderation.signals import local_features as lf
from tests.unit.test_classifier import unit
from tests.unit.test_feature_windows import blocklist_of


def _photo(name: str) -> Image.Image:
    pixels = getattr(data, name)()
    image = Image.fromarray(pixels)
    return image.convert("RGB")


ENTRIES = ("astronaut", "chelsea", "rocket", "coffee", "camera")


@pytest.fixture(scope="module")
def index() -> lf.LocalIndex:
    return lf.LocalIndex(
        {i: lf.extract(_photo(n), lf.ENTRY_SIDE, lf.ENTRY_KEYPOINTS) for i, n in enumerate(ENTRIES)}
    )


def _feathered_paste(
    photo: Image.Image, back: Image.Image, share: float, angle: float
) -> Image.Image:
    """``photo`` at ``share`` of ``back``'s width, soft-edged, rotated by ``angle`` degrees."""
    width = round(back.width * share)
    small = photo.resize(
        (width, round(width * photo.height / photo.width)), Image.Resampling.LANCZOS
    )
    mask = Image.new("L", small.size, 0)
    edge = max(2, width // 12)
    ImageDraw.Draw(mask).rectangle((edge, edge, small.width - edge, small.height - edge), fill=255)
    rgba = small.convert("RGBA")
    rgba.putalpha(mask.filter(ImageFilter.GaussianBlur(edge / 2)))
    rgba = rgba.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    out = back.convert("RGBA")
    out.alpha_composite(rgba, (back.width - rgba.width - 10, 15))
    return out.convert("RGB")


def _collage(photo: Image.Image, others: list[Image.Image]) -> Image.Image:
    """A 3 x 2 collage with gutters whose second tile is ``photo`` (each tile cropped to fit)."""
    tile = (200, 160)
    out = Image.new("RGB", (3 * tile[0] + 16, 2 * tile[1] + 12), (230, 40, 90))
    tiles = [others[0], photo, *others[1:]]
    for k, image in enumerate(tiles[:6]):
        fitted = ImageOps.fit(image, tile, Image.Resampling.BICUBIC)
        out.paste(fitted, (4 + (k % 3) * (tile[0] + 4), 4 + (k // 3) * (tile[1] + 4)))
    return out


def _best(found: dict[int, int]) -> tuple[int, int, int]:
    """(best entry, its inliers, the runner-up's inliers) of :meth:`LocalIndex.verify`."""
    ranked = sorted(found.items(), key=lambda kv: -kv[1])
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    return ranked[0][0], ranked[0][1], runner_up


@pytest.mark.parametrize(("share", "angle"), [(0.3, 20.0), (0.4, -15.0), (0.55, 0.0)])
def test_rotated_feathered_paste_is_verified(
    index: lf.LocalIndex, share: float, angle: float
) -> None:
    back = _photo("hubble_deep_field")
    query = _feathered_paste(_photo("chelsea"), back, share, angle)
    found = index.verify(lf.extract_query(query))
    entry, inliers, runner_up = _best(found)
    assert ENTRIES[entry] == "chelsea"
    assert inliers >= lf.CANDIDATE_INLIERS  # measured 15, 26, 43
    assert runner_up <= 5


def test_collage_tile_is_verified(index: lf.LocalIndex) -> None:
    others = [
        _photo(n) for n in ("hubble_deep_field", "immunohistochemistry", "cell", "moon", "text")
    ]
    query = _collage(_photo("rocket"), others)
    entry, inliers, runner_up = _best(index.verify(lf.extract_query(query)))
    assert ENTRIES[entry] == "rocket"
    assert inliers >= lf.CANDIDATE_INLIERS  # measured 10
    assert runner_up <= 5


@pytest.mark.parametrize("name", ["hubble_deep_field", "immunohistochemistry", "moon", "text"])
def test_unrelated_photo_has_few_inliers(index: lf.LocalIndex, name: str) -> None:
    found = index.verify(lf.extract_query(_photo(name)))
    assert max(found.values(), default=0) <= 5


def test_extract_bounds_and_rootsift_rows() -> None:
    kp = lf.extract(_photo("astronaut"), 256, 50)
    assert 0 < len(kp) <= 50
    assert kp.points.dtype == np.float32 and kp.points.shape == (len(kp), 2)
    assert kp.descriptors.shape == (len(kp), 128)
    np.testing.assert_allclose(np.linalg.norm(kp.descriptors, axis=1), 1.0, atol=1e-4)
    assert kp.points.max() < 256  # found on the copy of at most 256 px


def test_flat_image_has_no_keypoints_and_matches_nothing(index: lf.LocalIndex) -> None:
    flat = Image.new("RGB", (300, 200), (120, 120, 120))
    kp = lf.extract_query(flat)
    assert len(kp) == 0
    assert index.verify(kp) == {}


def test_bad_arguments_and_entry_cap() -> None:
    with pytest.raises(ValueError, match="side"):
        lf.extract(_photo("camera"), 8, 10)
    with pytest.raises(ValueError, match="count"):
        lf.extract(_photo("camera"), 256, 0)
    kp = lf.extract(_photo("camera"), 128, 20)
    with pytest.raises(ValueError, match="more than the 2 indexed"):
        lf.LocalIndex({1: kp, 2: kp, 3: kp}, max_entries=2)
    assert len(lf.LocalIndex({}, max_entries=2)) == 0
    assert lf.LocalIndex({}).verify(kp) == {}


# --- stored with the entry: packed region rows -------------------------------------------------


@pytest.mark.parametrize("dim", [1280, 512, 256])
def test_keypoints_pack_into_region_rows_and_survive_float16(dim: int) -> None:
    kp = lf.extract(_photo("astronaut"), lf.ENTRY_SIDE, 100)
    rows = lf.pack(kp, dim)
    assert rows.shape == (lf.packed_rows(len(kp), dim), dim) and rows.dtype == np.float32
    back = lf.unpack(rows.astype(np.float16))  # a spilled row file holds float16
    assert len(back) == len(kp)
    np.testing.assert_allclose(back.points, kp.points, atol=0.13)
    np.testing.assert_allclose(back.descriptors, kp.descriptors, atol=1e-3)
    assert lf.packed_rows(128, 1280) == 14  # ENTRY_KEYPOINTS at the default encoder's width
    assert len(lf.unpack(np.zeros((0, dim), np.float32))) == 0
    with pytest.raises(ValueError, match="do not hold"):
        lf.unpack(rows[:2])
    with pytest.raises(ValueError, match="do not pack"):
        lf.pack(kp, 64)


ROW_DIM = 256


def _rows_of(image: Image.Image, vector: np.ndarray, keypoints: bool) -> np.ndarray:
    """An entry's region rows: five windows and a paste descriptor (copies of ``vector``), then
    (``keypoints``) its packed keypoints."""
    rows = [np.tile(vector, (ENTRY_WINDOW_ROWS + 1, 1))]
    if keypoints:
        rows.append(lf.pack(lf.extract(image, lf.ENTRY_SIDE, 100), ROW_DIM))
    return np.concatenate(rows).astype(np.float32)


BANK_PHOTOS = ("astronaut", "chelsea", "rocket", "coffee")


def _bank(pdq: dict[int, tuple[bytes, int]] | None = None) -> Blocklist:
    """Entries 1-3 (astronaut, chelsea, rocket) with keypoints, entry 4 (coffee) without;
    PDQ digests from ``pdq`` (default none)."""
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(4, ROW_DIM)))
    regions = {
        i + 1: _rows_of(_photo(n), vectors[i], keypoints=i < 3) for i, n in enumerate(BANK_PHOTOS)
    }
    return blocklist_of(vectors, regions, pdq)


@pytest.fixture(scope="module")
def bank() -> Blocklist:
    return _bank()


def test_a_blocklist_indexes_the_keypoint_rows_of_entries_that_have_them(bank: Blocklist) -> None:
    index = local_index(bank)
    assert index is local_index(bank)  # built once per version
    assert sorted(index.entry_ids.tolist()) == [1, 2, 3]
    query = _feathered_paste(_photo("chelsea"), _photo("hubble_deep_field"), 0.4, 12.0)
    found = index.verify(lf.extract_query(query))
    assert max(found, key=lambda e: found[e]) == 2 and found[2] >= lf.CANDIDATE_INLIERS
    # The windows and the paste descriptor the other features read are unchanged.
    regions = RegionLookup(bank)
    assert len(regions(2)) == ENTRY_WINDOW_ROWS and len(regions.paste(2)) == 1
    assert len(regions.rows(2)) > ENTRY_WINDOW_ROWS + 1 and len(regions.rows(4)) == 6


def test_a_blocklist_past_the_entry_cap_gets_no_local_index(
    bank: Blocklist, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(keypoint_rows, "LOCAL_INDEX_MAX_ENTRIES", 3)
    monkeypatch.setattr(keypoint_rows, "_indexes", VersionCache())
    assert len(local_index(bank)) == 0  # 4 entries with embeddings
    assert "more than the 3 whose keypoints are indexed" in caplog.text


def test_verified_entries_become_candidates_and_a_feature(bank: Blocklist) -> None:
    vectors = unit(np.ones((1, ROW_DIM)))
    found = merge_verified(bank, [], vectors, {2: 20, 3: lf.CANDIDATE_INLIERS - 1, 99: 50})
    assert [c.entry.entry_id for c in found] == [2]  # 3: too few inliers; 99: not in the bank
    assert found[0].cosine == pytest.approx(float(vectors[0] @ bank.vector_of(2)), abs=1e-6)
    again = merge_verified(bank, found, vectors, {2: 30})
    assert again is found  # already a candidate
    assert merge_verified(bank, [], vectors, {2: 20}, Scope(banks=frozenset({7}))) == []
    signals = QuerySignals(vectors, (), local={2: 15, 3: 90})
    assert local_inliers(signals, 2) == pytest.approx(15 / LOCAL_INLIER_CAP)
    assert local_inliers(signals, 3) == 1.0 and local_inliers(signals, 1) == 0.0
    assert local_inliers(QuerySignals(vectors, ()), 2) == 0.0
    assert lf.wanted(None) and lf.wanted(lf.SKIP_COSINE - 0.01) and not lf.wanted(lf.SKIP_COSINE)


class _FakeEncoder:
    """Just enough of an encoder for :func:`make_region_embedder`: constant unit rows (512
    wide: 128 keypoints' coordinates need 257 values in row 0)."""

    dim = 512
    has_feature_windows = True

    def encode(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        return unit(np.ones((len(images), self.dim)))

    def encode_paste_descriptors(
        self, images: list[Image.Image], batch_size: int = 32
    ) -> np.ndarray:
        return unit(np.ones((len(images), self.dim)))


def test_import_stores_keypoints_after_the_paste_descriptor_only_when_asked() -> None:
    from moderation.matching.classifier.regions import make_region_embedder

    photos = [_photo("chelsea"), _photo("rocket")]
    encoder = _FakeEncoder()
    with_local = make_region_embedder(encoder, paste=True, local=True)(photos)  # type: ignore[arg-type]
    plain = make_region_embedder(encoder, paste=True)(photos)  # type: ignore[arg-type]
    for rows, flat, photo in zip(with_local, plain, photos, strict=True):
        assert len(flat) == ENTRY_WINDOW_ROWS + 1
        np.testing.assert_array_equal(rows[: len(flat)], flat)
        stored = lf.unpack(rows[keypoint_rows.KEYPOINT_ROW :])
        fresh = lf.extract(photo, lf.ENTRY_SIDE, lf.ENTRY_KEYPOINTS)
        assert len(stored) == len(fresh) > 50
        np.testing.assert_allclose(stored.points, fresh.points)
    # Without the paste descriptor there is no fixed place for them: none are stored.
    assert len(make_region_embedder(encoder, local=True)(photos)[0]) == ENTRY_WINDOW_ROWS  # type: ignore[arg-type]
    # A budget (the entry cap less the entries already banked) counts over the whole import.
    budgeted = make_region_embedder(encoder, paste=True, local=True, keypoint_budget=2)  # type: ignore[arg-type]
    first, second = budgeted(photos[:1]), budgeted(photos)
    assert [len(r) for r in first + second] == [len(with_local[0])] * 2 + [len(plain[1])]
    spent = make_region_embedder(encoder, paste=True, local=True, keypoint_budget=0)(photos)  # type: ignore[arg-type]
    assert [len(r) for r in spent] == [len(r) for r in plain]


def test_training_copies_are_verified_as_screening_verifies_queries(bank: Blocklist) -> None:
    from moderation.matching.classifier.synthetic import _candidates
    from moderation.signals.pdq import pdq_hash_dihedral

    query = _feathered_paste(_photo("chelsea"), _photo("hubble_deep_field"), 0.4, -10.0)
    keypoints = lf.extract_query(query)
    pdq = (pdq_hash_dihedral(query),)
    far = unit(np.ones((1, ROW_DIM)) - 2 * bank.vector_of(2))  # no global candidate at all
    found, signals = _candidates(bank, QuerySignals(far, pdq, keypoints=keypoints))
    assert [entry for entry, _, _ in found] == [2]  # found by local features only
    assert signals.local is not None and signals.local[2] >= lf.CANDIDATE_INLIERS
    # A query whose global vector already matches at or above SKIP_COSINE is not verified.
    near = unit(bank.vector_of(2)[None])
    found, signals = _candidates(bank, QuerySignals(near, pdq, keypoints=keypoints))
    assert found[0][0] == 2 and signals.local is None


class _VectorEncoder:
    """An encoder whose embedding of every input is ``vector`` (decoded frames pass through):
    enough of the interface for a :class:`Screener`."""

    id = "test-encoder"
    preprocessing = "test"
    has_feature_windows = False

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def preprocess(self, frames: list[Image.Image]) -> list[Image.Image]:
        return list(frames)

    def encode_inputs(self, inputs: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        return np.tile(self.vector, (len(inputs), 1)).astype(np.float32)


class _LocalRefiner:
    """A classifier stage that asks for local features and records what it was given."""

    version = "test"
    feature_windows = False
    local_features = True

    def __init__(self) -> None:
        self.seen: list[dict[int, int] | None] = []

    def refine_batch(self, items: list, blocklist: Blocklist) -> None:  # type: ignore[type-arg]
        for context, candidates in items:
            self.seen.append(context.local)
            for candidate in candidates:
                candidate.probability = 0.5


def _png(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _screener(bank: Blocklist, vector: np.ndarray, refiner: _LocalRefiner) -> Any:
    from moderation.matching.policy import load_policy
    from moderation.matching.screening import Screener
    from moderation.media.decode import DecodeLimits

    return Screener(
        encoder=_VectorEncoder(vector),  # type: ignore[arg-type]
        blocklist=bank,
        policy=load_policy(Path(__file__).parents[2] / "policies", "default"),
        limits=DecodeLimits(),
        refiner=refiner,  # type: ignore[arg-type]
        draft_size=None,
    )


def _spy_on_submit(screener: Any, monkeypatch: pytest.MonkeyPatch) -> list[Image.Image]:
    """The images ``screener`` submits to its background verifier from now on."""
    submitted: list[Image.Image] = []
    real_submit = screener.verifier.submit
    monkeypatch.setattr(
        screener.verifier,
        "submit",
        lambda image, index: submitted.append(image) or real_submit(image, index),
    )
    return submitted


def test_screening_verifies_uploads_in_the_background_and_cancels_the_unwanted(
    bank: Blocklist, monkeypatch: pytest.MonkeyPatch
) -> None:
    paste = _feathered_paste(_photo("chelsea"), _photo("hubble_deep_field"), 0.4, 12.0)
    unrelated = _photo("immunohistochemistry")
    far = unit(np.ones((1, ROW_DIM)) - 2 * bank.vector_of(2))[0]  # no global candidate at all
    refiner = _LocalRefiner()
    screener = _screener(bank, far, refiner)
    submitted = _spy_on_submit(screener, monkeypatch)
    prepared = screener.prepare([_png(paste), _png(unrelated), b"not an image"])
    assert len(submitted) == 2  # queued as decoded; the undecodable one is not
    assert all(w.verifying is not None for w in prepared.works[:2])
    results = screener.finish(prepared)
    paste_work, unrelated_work, _ = prepared.works
    assert paste_work.verifying is None and unrelated_work.verifying is None
    inline = local_index(bank).verify(lf.extract_query(paste))
    assert paste_work.local == inline and inline[2] >= lf.CANDIDATE_INLIERS
    assert [c["entry_id"] for c in results[0].explanation["candidates"]][:1] == ["e_2"]
    assert max(unrelated_work.local.values(), default=0) < lf.CANDIDATE_INLIERS  # type: ignore[union-attr]
    assert results[1].explanation["candidates"] == [] and results[2].decision == "unscannable"
    assert refiner.seen == [paste_work.local]  # only the paste had a candidate to refine

    # A global match at or above SKIP_COSINE needs no local features: its work is cancelled
    # (or finishes unused) and the classifier stage gets none.
    near = _screener(bank, unit(bank.vector_of(2)[None])[0], _LocalRefiner())
    prepared = near.prepare([_png(paste)])
    pending = prepared.works[0].verifying
    near.finish(prepared)
    assert pending is not None and (pending.cancelled() or pending.result(timeout=60))
    assert prepared.works[0].local is None


def test_a_verification_against_a_replaced_index_is_redone_inline(bank: Blocklist) -> None:
    from concurrent.futures import Future

    from moderation.matching.screening import _inliers

    paste = _collage(_photo("rocket"), [_photo(n) for n in ("coffee", "camera", "moon")])
    stale: Future[lf.Verified] = Future()
    stale.set_running_or_notify_cancel()
    stale.set_result(lf.Verified(lf.LocalIndex({}), {3: 99}))
    found = _inliers(paste, stale, local_index(bank))
    assert found != {3: 99} and found[3] >= lf.CANDIDATE_INLIERS
    # A background verification not started yet is cancelled and run by the caller.
    queued: Future[lf.Verified] = Future()
    assert _inliers(paste, queued, local_index(bank)) == found and queued.cancelled()
    verifier = lf.BackgroundVerifier()
    done = verifier.submit(paste, local_index(bank)).result(timeout=60)
    assert done.inliers == found and done.index is local_index(bank)
    verifier.close()
    assert verifier.submit(paste, local_index(bank)).result(timeout=60).inliers == found
    verifier.close()


def test_a_pdq_copy_is_not_verified_ahead_yet_verified_when_its_search_wants_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moderation.signals.pdq import pdq_hash_dihedral

    chelsea = _photo("chelsea")
    digest = pdq_hash_dihedral(chelsea)[0]
    bank = _bank({2: (digest.digest, digest.quality)})
    paste = _feathered_paste(_photo("astronaut"), _photo("hubble_deep_field"), 0.45, 8.0)
    far = unit(np.ones((1, ROW_DIM)) - 2 * bank.vector_of(2))[0]
    screener = _screener(bank, far, _LocalRefiner())
    submitted = _spy_on_submit(screener, monkeypatch)
    prepared = screener.prepare([_png(chelsea), _png(paste)])
    assert len(submitted) == 1 and prepared.works[0].verifying is None  # PDQ within 31 bits
    screener.finish(prepared)
    copy, pasted = prepared.works
    # Its vector is far from every entry here, so the search wants local features: inline.
    assert copy.local is not None and copy.local[2] >= lf.CANDIDATE_INLIERS
    assert pasted.local is not None and pasted.local[1] >= lf.CANDIDATE_INLIERS


def test_keypoint_budget_is_the_entry_cap_less_the_image_entries(runtime: Any) -> None:
    """An import stores keypoints only while the banks hold fewer image entries than the local
    index's cap; hash-list entries (no embedding) do not count."""
    from moderation.banks.keypoint_rows import keypoint_budget
    from moderation.banks.records import create_bank
    from moderation.storage.models import Entry

    with runtime.sessions() as session:
        assert keypoint_budget(session) == lf.LOCAL_INDEX_MAX_ENTRIES
        bank = create_bank(session, "known-bad", kind="block")
        session.flush()
        session.add_all([Entry(bank_id=bank.id) for _ in range(3)])
        session.add(Entry(bank_id=bank.id, origin="hash_list"))
        session.flush()
        assert keypoint_budget(session) == lf.LOCAL_INDEX_MAX_ENTRIES - 3
        session.rollback()
