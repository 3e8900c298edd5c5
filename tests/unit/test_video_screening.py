"""Video uploads through the screening pipeline: real clips, the real encoder, a real snapshot.

The bank of test_screening.py (astronaut, chelsea, coffee); clips show unrelated photos with a
banked one flashed for 0.4 s between them (tests/video_clips.py).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from moderation.banks.hash_import import import_hash_list
from moderation.banks.records import create_bank
from moderation.governance.review import ReviewError
from moderation.governance.review_decisions import prepare_bank_entry
from moderation.governance.review_display import render_upload
from moderation.matching.screening import Screener
from moderation.media.video import VideoLimits
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from tests.unit import test_screening
from tests.unit.test_screening import jpeg
from tests.video_clips import clip, edited, photo

# The module-scoped fixtures of test_screening.py: a runtime whose bank holds its photos, and
# its screener.
bank_runtime = test_screening.bank_runtime
screener = test_screening.screener


def flashed(banned_frame: object, kind: str = "mp4") -> bytes:
    """rocket 1.5 s, then ``banned_frame`` 0.4 s (from 1.5 s), then motorcycle 1.5 s."""
    return clip(
        [(photo("rocket"), 1.5), (banned_frame, 0.4), (photo("motorcycle_left"), 1.5)], kind
    )


@pytest.mark.parametrize("kind", ["mp4", "webm", "mov"])
def test_a_flashed_banked_photo_is_blocked_at_its_time(screener: Screener, kind: str) -> None:
    [result] = screener.screen_bytes([flashed(photo("astronaut"), kind)])
    assert result.decision == "block", result.explanation
    top = result.matches[0]
    assert top.entry.label == "astronaut"
    # Frame 15, the scene change to the astronaut: between the fixed-rate frames 10 and 20.
    assert top.timestamp_s == pytest.approx(1.5)
    assert top.to_json()["timestamp_s"] == pytest.approx(1.5)
    assert top.to_json()["signals"]["timestamp_s"] == pytest.approx(1.5)
    video = result.explanation["video"]
    assert video["matched_frame"] == {"frame": 15, "timestamp_s": pytest.approx(1.5)}
    assert 15 in video["scene_changes"] and video["vpdq_frames"] == 4
    assert video["format"] == {"mp4": "MP4", "webm": "WEBM", "mov": "MOV"}[kind]


def test_an_edited_copy_is_flagged(screener: Screener) -> None:
    [result] = screener.screen_bytes([flashed(edited(photo("chelsea")))])
    assert result.decision in ("block", "review"), result.explanation
    assert result.matches[0].entry.label == "chelsea"
    assert result.matches[0].timestamp_s == pytest.approx(1.5)


def test_an_unrelated_video_is_allowed(screener: Screener) -> None:
    data = clip([(photo("rocket"), 1.5), (photo("horse"), 1.0), (photo("motorcycle_left"), 1.5)])
    [result] = screener.screen_bytes([data])
    assert (result.decision, result.matches) == ("allow", ())
    assert result.explanation["video"]["frames_decoded"] == 40


def test_videos_and_images_share_a_batch(screener: Screener) -> None:
    results = screener.screen_bytes(
        [jpeg(photo("chelsea")), flashed(photo("astronaut")), jpeg(photo("rocket"))]
    )
    assert [r.decision for r in results] == ["block", "block", "allow"]
    assert "video" not in results[0].explanation and results[0].matches[0].timestamp_s is None


def test_broken_and_oversized_videos_are_unscannable(bank_runtime: Runtime) -> None:
    data = flashed(photo("astronaut"))
    limited = Screener(
        encoder=bank_runtime.encoder,
        blocklist=bank_runtime.load_blocklist(),
        policy=bank_runtime.policy,
        limits=bank_runtime.limits,
        video_limits=VideoLimits(max_duration_s=2.0),
    )
    truncated, too_long = limited.screen_bytes([data[: len(data) // 2], data])
    assert (truncated.decision, truncated.reason) == ("unscannable", "truncated")
    assert (too_long.decision, too_long.reason) == ("unscannable", "too_long")
    assert "2.0 s" in too_long.explanation["detail"]


def test_review_shows_the_matched_frame_and_a_video_is_not_banked(
    bank_runtime: Runtime, tmp_path: Path
) -> None:
    path = tmp_path / "flash.mp4"
    path.write_bytes(flashed(photo("astronaut")))
    rows: list[dict[str, Any]] = []
    screen_paths(bank_runtime, [path], on_result=rows.append)
    assert rows[0]["decision"] == "block"
    shown = render_upload(bank_runtime, rows[0]["upload_id"], preview=False)
    assert shown is not None and (shown.width, shown.height) == (320, 240)
    frame = Image.open(io.BytesIO(shown.jpeg)).convert("RGB").resize((32, 24))
    expected = photo("astronaut").resize((32, 24))
    diff = [abs(a - b) for a, b in zip(frame.tobytes(), expected.tobytes(), strict=True)]
    assert sum(diff) / len(diff) < 15  # the astronaut frame at 1.5 s, not the first (rocket)
    with pytest.raises(ReviewError, match="video"):
        prepare_bank_entry(bank_runtime, rows[0]["upload_id"], "known-bad", "confirm")


def test_a_video_on_a_hash_list_matches_exactly_without_a_frame(
    bank_runtime: Runtime, tmp_path: Path
) -> None:
    data = clip([(photo("rocket"), 1.0), (photo("horse"), 1.0)])
    with transaction(bank_runtime.sessions) as session:
        create_bank(session, "video-hashes")
    listing = tmp_path / "videos.txt"
    listing.write_text(f"md5 {hashlib.md5(data).hexdigest()}\n")
    import_hash_list(bank_runtime, "video-hashes", listing, actor="test")
    [result] = bank_runtime.screener().screen_bytes([data])
    assert result.decision == "block", result.explanation
    assert result.matches[0].exact == "md5" and result.matches[0].timestamp_s is None
    explained = result.matches[0].to_json()
    assert explained["decided_by"] == "exact_hash" and explained["signals"]["frame"] is None
    assert "timestamp_s" not in explained["signals"]
    assert "matched_frame" not in result.explanation["video"]
