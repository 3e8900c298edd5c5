"""The screening pipeline: policy decisions, and real photos through the real encoder."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from moderation.banks.operations import import_bank, set_entry_disabled
from moderation.banks.records import EntryInfo, create_bank
from moderation.config import load_settings
from moderation.matching.candidates import Candidate
from moderation.matching.policy import parse_policy
from moderation.matching.preparing import Work
from moderation.matching.screening import Screener
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.storage.db import transaction
from tests.conftest import skimage_photo, skimage_photo_path

BANNED = ("chelsea", "astronaut", "coffee")

POLICY = {
    "name": "test",
    "categories": {
        "default": {
            "block_cosine": 0.8,
            "review_cosine": 0.65,
            "block_pdq_distance": 16,
            "review_pdq_distance": 31,
            "review_priority": 40,
        },
        "violent": {
            "banks": ["gore"],
            "action": "review",
            "block_cosine": 0.8,
            "review_cosine": 0.65,
            "review_priority": 80,
        },
        "prob": {
            "block_cosine": 0.8,
            "review_cosine": 0.65,
            "block_pdq_distance": 16,
            "block_probability": 0.9,
            "review_probability": 0.5,
        },
    },
}


def jpeg(image: Image.Image, quality: int = 90, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bank_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A runtime whose block bank holds three skimage photos (real encoder, real snapshot)."""

    base = tmp_path_factory.mktemp("screening")
    settings = load_settings(data_dir=base / "var")
    runtime = prepared_runtime(settings)
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    import_bank(runtime, "known-bad", [skimage_photo_path(name) for name in BANNED], actor="test")
    yield runtime
    runtime.engine.dispose()


@pytest.fixture(scope="module")
def screener(bank_runtime: Runtime) -> Screener:
    return bank_runtime.screener()


# --- decisions over synthetic candidates ---------------------------------------------------


def entry(
    eid: int, *, kind: str = "block", category: str = "default", bank: str = "b"
) -> EntryInfo:
    return EntryInfo(eid, 1, bank, kind, category, f"label{eid}")


def decide(screener: Screener, candidates: list[Candidate], **policy_changes: Any) -> Any:
    document = {**POLICY, **policy_changes}
    original = screener.policy
    screener.policy = parse_policy(document, source="test")
    try:
        work = Work(0)
        work.decoded = type("D", (), {"frames": (None,), "frame_indices": (0,)})()  # type: ignore[assignment]
        return screener.decide(work, candidates)
    finally:
        screener.policy = original


def test_cosine_above_block_threshold_blocks(screener: Screener) -> None:
    result = decide(screener, [Candidate(entry(1), cosine=0.85), Candidate(entry(2), cosine=0.5)])
    assert result.decision == "block"
    assert result.score == pytest.approx(0.85)
    assert [m.entry.entry_id for m in result.matches] == [1]
    assert "cosine" in result.matches[0].signals
    assert result.explanation["thresholds"]["block_cosine"] == 0.8


def test_uncertain_band_goes_to_review_with_priority(screener: Screener) -> None:
    result = decide(screener, [Candidate(entry(1), cosine=0.7)])
    assert result.decision == "review"
    assert result.review_priority == 40
    assert result.needs_review


def test_below_review_threshold_allows_but_reports_score(screener: Screener) -> None:
    result = decide(screener, [Candidate(entry(1), cosine=0.6)])
    assert (result.decision, result.matches) == ("allow", ())
    assert result.score == pytest.approx(0.6)


def test_pdq_alone_can_block(screener: Screener) -> None:
    result = decide(screener, [Candidate(entry(1), cosine=0.3, pdq_distance=10)])
    assert result.decision == "block"
    assert "pdq" in result.matches[0].signals
    review = decide(screener, [Candidate(entry(1), cosine=0.3, pdq_distance=25)])
    assert review.decision == "review"


def test_allow_bank_suppresses_weaker_block_match(screener: Screener) -> None:
    block = Candidate(entry(1), cosine=0.85)
    allow = Candidate(entry(2, kind="allow"), cosine=0.95)
    result = decide(screener, [block, allow])
    assert (result.decision, result.reason) == ("allow", "allow_bank")
    assert result.explanation["suppressed_by_allow_bank"]["entry_id"] == "e_2"
    # A block match stronger than the allow match stands.
    stronger = decide(screener, [Candidate(entry(1), cosine=0.97), allow])
    assert stronger.decision == "block"


def test_category_rules_choose_banks_and_action(screener: Screener) -> None:
    gore = Candidate(entry(1, category="violent", bank="gore"), cosine=0.9)
    result = decide(screener, [gore])
    assert result.decision == "review"  # the category's action is review, not block
    assert (result.category, result.review_priority) == ("violent", 80)
    other_bank = Candidate(entry(2, category="violent", bank="other"), cosine=0.9)
    assert decide(screener, [other_bank]).decision == "allow"


def test_probability_thresholds_decide_inside_the_band(screener: Screener) -> None:
    # Safety floor: cosine above block_cosine with p = 0.3 is not allowed, only sent to review.
    low = Candidate(entry(1, category="prob"), cosine=0.95, probability=0.3)
    floored = decide(screener, [low])
    assert floored.decision == "review"
    assert "classifier_band" in floored.matches[0].signals
    assert floored.explanation["thresholds"]["classifier_band"] == {"max_lower": 1, "max_raise": 2}
    mid = Candidate(entry(1, category="prob"), cosine=0.5, probability=0.6)
    assert decide(screener, [mid]).decision == "review"
    high = Candidate(entry(1, category="prob"), cosine=0.5, probability=0.95)
    result = decide(screener, [high])
    assert (result.decision, result.score) == ("block", pytest.approx(0.95))
    # Inside the band the classifier still lowers a review-level match to nothing.
    weak = Candidate(entry(1, category="prob"), cosine=0.7, probability=0.1)
    assert decide(screener, [weak]).decision == "allow"


def _with_band(**band: int) -> dict[str, Any]:
    categories = dict(POLICY["categories"])  # type: ignore[call-overload]
    categories["prob"] = {**categories["prob"], "classifier_band": band}
    return {"categories": categories}


@pytest.mark.parametrize(
    ("cosine", "pdq", "probability", "band", "expected"),
    [
        # PDQ within block_pdq_distance is held like cosine: never allow, whatever p.
        (0.3, 10, 0.0, {}, "review"),
        # max_lower 0: the classifier cannot lower at all.
        (0.95, None, 0.0, {"max_lower": 0}, "block"),
        (0.7, None, 0.0, {"max_lower": 0}, "review"),
        # max_raise 1: a match below review_cosine reaches review at most...
        (0.5, None, 0.99, {"max_raise": 1}, "review"),
        # ...and max_raise 0 leaves it where cosine and PDQ put it.
        (0.5, None, 0.99, {"max_raise": 0}, "allow"),
        (0.7, None, 0.99, {"max_raise": 0}, "review"),
        # Exact-hash matches are outside the classifier's reach.
        (None, None, 0.0, {}, "block"),
    ],
)
def test_classifier_band_bounds_the_classifier(
    screener: Screener,
    cosine: float | None,
    pdq: int | None,
    probability: float,
    band: dict[str, int],
    expected: str,
) -> None:
    cand = Candidate(
        entry(1, category="prob"),
        cosine=cosine,
        pdq_distance=pdq,
        probability=probability,
        exact="sha256" if cosine is None and pdq is None else None,
    )
    assert decide(screener, [cand], **_with_band(**band)).decision == expected


def test_unscannable_follows_policy(screener: Screener) -> None:
    result = screener.screen_unscannable("too_large", "over the byte limit")
    assert (result.decision, result.reason) == ("unscannable", "too_large")
    assert result.needs_review
    assert result.to_json()["decision"] == "unscannable"


# --- real photos through the real encoder -------------------------------------------------


def test_edited_copies_match_and_unrelated_photos_do_not(screener: Screener) -> None:
    chelsea = skimage_photo("chelsea")
    width, height = chelsea.size
    copies = [
        jpeg(chelsea, quality=20),
        jpeg(ImageOps.mirror(chelsea)),
        jpeg(chelsea.crop((20, 20, width - 40, height - 30))),
        jpeg(ImageOps.grayscale(chelsea).convert("RGB")),
    ]
    unrelated = [jpeg(skimage_photo(name)) for name in ("rocket", "hubble_deep_field")]
    results = screener.screen_bytes(copies + unrelated)
    for result in results[:4]:
        assert result.decision in ("block", "review"), result.explanation
        assert result.matches[0].entry.label == "chelsea"
    for result in results[4:]:
        assert result.decision == "allow", result.explanation
    assert all(r.timings_ms["total"] > 0 for r in results)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_banned_photo_with_exif_orientation_still_matches(
    screener: Screener, orientation: int
) -> None:
    """RELIABILITY.md I5: stored rotated, upright by EXIF."""
    upright = skimage_photo("astronaut")
    stored = {
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    (result,) = screener.screen_bytes([jpeg(stored, exif=exif.tobytes())])
    assert result.decision == "block"
    assert result.matches[0].entry.label == "astronaut"


def test_banned_photo_hidden_in_a_later_gif_frame(screener: Screener) -> None:
    """RELIABILITY.md I6: never allow; the banned frame is found."""
    benign = skimage_photo("rocket").resize((256, 192))
    banned = skimage_photo("coffee").resize((256, 192))
    frames = [benign.rotate(i) for i in range(30)]
    frames[23] = banned
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    (result,) = screener.screen_bytes([buffer.getvalue()])
    assert result.decision in ("block", "review")
    assert result.matches[0].entry.label == "coffee"
    assert result.matches[0].frame == result.explanation["frame_indices"].index(23)


def test_disabled_entry_stops_matching(bank_runtime: Runtime, tmp_path: Path) -> None:
    chelsea_copy = jpeg(skimage_photo("chelsea"), quality=60)
    with bank_runtime.sessions() as session:
        from sqlalchemy import select

        from moderation.banks.sealed_fields import entry_labels
        from moderation.storage.models import Entry

        ids = session.scalars(select(Entry.id)).all()
        labels = entry_labels(session, bank_runtime.keyring, ids)
        eid = next(e for e, label in labels.items() if label == "chelsea")
    set_entry_disabled(bank_runtime, f"e_{eid}", disabled=True, actor="test")
    try:
        (result,) = bank_runtime.screener().screen_bytes([chelsea_copy])
        assert all(m.entry.label != "chelsea" for m in result.matches)
    finally:
        set_entry_disabled(bank_runtime, f"e_{eid}", disabled=False, actor="test")
    (again,) = bank_runtime.screener().screen_bytes([chelsea_copy])
    assert again.decision == "block"


def test_encoder_mismatch_is_refused(screener: Screener) -> None:
    from dataclasses import replace

    blocklist = replace(screener.blocklist, encoder_id="timm/other|sha256=00|resize=1")
    with pytest.raises(ValueError, match="differs from the snapshot"):
        Screener(
            encoder=screener.encoder,
            blocklist=blocklist,
            policy=screener.policy,
            limits=screener.limits,
        )


def test_vectors_in_snapshot_are_unit_norm(screener: Screener) -> None:
    vectors = screener.blocklist.payload.vectors
    assert vectors.shape == (len(BANNED), screener.encoder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("windows", [False, True])
def test_uploads_embedded_early_screen_as_if_embedded_by_the_screener(
    bank_runtime: Runtime, screener: Screener, windows: bool
) -> None:
    """A pipeline embeds prepared uploads before the screener exists (``Preparer.embed``,
    with feature-map windows when the classifier stage may want them): the screener keeps
    those vectors, drops windows it does not use, and decides exactly as it would alone."""
    from dataclasses import replace

    chelsea = skimage_photo("chelsea")
    uploads = [jpeg(chelsea, quality=30), jpeg(skimage_photo("rocket")), b"not an image"]
    alone = screener.finish(screener.preparer.prepare(uploads))
    preparer = replace(bank_runtime.preparer(), feature_windows=windows)
    early = preparer.embed(preparer.prepare(uploads))
    works = early.works
    assert works[0].vectors is not None and works[2].vectors is None
    assert (works[0].windows is not None) == (windows and screener.encoder.has_feature_windows)
    kept = works[0].vectors
    results = screener.finish(early)
    assert works[0].vectors is kept  # not embedded twice
    assert works[0].windows is None  # this screener has no classifier stage asking for them
    assert [r.to_json()["decision"] for r in results] == [r.to_json()["decision"] for r in alone]
    assert [r.score for r in results] == pytest.approx([r.score for r in alone], abs=1e-6)
