"""vPDQ signatures (moderation.signals.vpdq): computed from real clips, both exchange forms, the
match rule, and agreement with python-threatexchange's own VPDQ code and ThreatExchange's sample
hash files."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

from moderation.matching.video import decode_video_upload
from moderation.media.video import VideoLimits
from moderation.signals.pdq import pdq_hash
from moderation.signals.vpdq import (
    VpdqFeature,
    match_features,
    parse_file_text,
    parse_signal_str,
    to_file_text,
    to_signal_str,
    usable,
)
from tests.video_clips import clip, photo, recoloured

# The first lines of ThreatExchange's vpdq/sample-hashes/chair-19-sd-bar.txt (the reference
# hasher's output for one of its sample videos).
SAMPLE_LINES = """\
0,100,e271017837246aaccddea259648fb7d62f435c89d9e99b2497763e216c8d055c,0.000
1,100,c0f11178372c6aaccddea259648fbfd62f434c89c9e99b249772be216c8d055c,0.033
2,100,c0f10b78372c6aacc5dea25b748fb7d22f434c89c9a9db249772b6216c8d855c,0.067
3,100,c0f00b7837247aaccddea25b128fb7d22f434c894da9cb349776b621668dc55c,0.100
4,100,c0700b78372e7aaccddea15b128f97c22f434c896da9cb349772f621668dc55c,0.133
"""


def features_of(data: bytes) -> list[VpdqFeature]:
    return list(decode_video_upload(data, VideoLimits()).vpdq)


@pytest.fixture(scope="module")
def original() -> list[VpdqFeature]:
    return features_of(clip([(photo("astronaut"), 2.0), (photo("coffee"), 2.0)], "mp4"))


def test_features_are_pdq_of_the_fixed_rate_frames(original: list[VpdqFeature]) -> None:
    assert [(f.frame_number, f.timestamp) for f in original] == [
        (0, 0.0),
        (10, 1.0),
        (20, 2.0),
        (30, 3.0),
    ]
    assert all(f.quality >= 50 for f in original)
    # Frame 0 is the astronaut photo itself, through H.264.
    assert (
        pdq_hash(photo("astronaut")).distance(
            pdq_hash(photo("astronaut")).from_hex(original[0].pdq_hex)
        )
        <= 31
    )


def test_file_form_round_trips_and_reads_the_reference_sample() -> None:
    sample = parse_file_text(SAMPLE_LINES)
    assert [f.frame_number for f in sample] == [0, 1, 2, 3, 4]
    assert sample[2].timestamp == pytest.approx(0.067)
    assert to_file_text(sample) == SAMPLE_LINES
    with pytest.raises(ValueError, match="line 2"):
        parse_file_text(SAMPLE_LINES.splitlines()[0] + "\n1,100,zz,0.1\n")


def test_signal_form_round_trips(original: list[VpdqFeature]) -> None:
    text = to_signal_str(original)
    parsed = parse_signal_str(text)
    assert [(f.pdq_hex, f.quality, f.timestamp) for f in parsed] == [
        (f.pdq_hex, f.quality, f.timestamp) for f in original
    ]
    assert parse_signal_str("") == []
    for bad in ("{}", '["x,1,0"]', '["' + "0" * 64 + ',101,0"]', "not json"):
        with pytest.raises(ValueError):
            parse_signal_str(bad)


def test_match_rule_on_real_clips(original: list[VpdqFeature]) -> None:
    # Recoloured and re-encoded with another codec (PDQ, so vPDQ, does not survive crops).
    copy = features_of(clip([(recoloured(photo("astronaut")), 2), (photo("coffee"), 2)], "webm"))
    other = features_of(clip([(photo("rocket"), 2.0), (photo("chelsea"), 2.0)], "mov"))
    half = features_of(clip([(photo("astronaut"), 2.0), (photo("rocket"), 2.0)], "mp4"))
    assert match_features(original, original).is_match()
    assert match_features(copy, original).is_match()
    assert not match_features(other, original).is_match()
    partial = match_features(half, original)
    assert partial.query_match_percent == pytest.approx(50.0)
    assert not partial.is_match()
    assert partial.is_match(query_threshold=50.0)


def test_dedupe_and_quality_filter() -> None:
    a, b = "a" * 64, "b" * 64
    features = [VpdqFeature(0, 90, a, 0.0), VpdqFeature(1, 90, a, 1.0), VpdqFeature(2, 10, b, 2.0)]
    assert usable(features) == [features[0]]
    assert match_features(features[2:], features).query_match_percent == 0.0


# --- python-threatexchange's own VPDQ code -----------------------------------------------------


def test_serialisation_is_byte_identical_to_threatexchange(
    threatexchange_vpdq: types.ModuleType, original: list[VpdqFeature]
) -> None:
    util = importlib.import_module("threatexchange.extensions.vpdq.vpdq_util")
    theirs = [util.VpdqCompactFeature(f.pdq_hex, f.quality, f.timestamp) for f in original]
    theirs.append(util.VpdqCompactFeature("ab" * 32, 77, 12.345))
    ours = [*original, VpdqFeature(4, 77, "ab" * 32, 12.345)]
    assert to_signal_str(ours) == util.vpdq_to_json(theirs)
    parsed = util.json_to_vpdq(to_signal_str(ours))
    assert [(f.pdq_hex, f.quality) for f in parsed] == [(f.pdq_hex, f.quality) for f in ours]
    threatexchange_vpdq.VPDQSignal.validate_signal_str(to_signal_str(ours))


def test_match_percentages_equal_threatexchange(
    threatexchange_vpdq: types.ModuleType, original: list[VpdqFeature]
) -> None:
    signal = threatexchange_vpdq.VPDQSignal
    half = features_of(clip([(photo("astronaut"), 2.0), (photo("rocket"), 2.0)], "mp4"))
    other = features_of(clip([(photo("rocket"), 2.0), (photo("chelsea"), 2.0)], "mov"))
    for query in (original, half, other):
        result = signal.compare_hash(to_signal_str(query), to_signal_str(original))
        ours = match_features(query, original)
        assert result.match == ours.is_match()
        assert result.distance.query_match_percent == pytest.approx(ours.query_match_percent)
        assert result.distance.compared_match_percent == pytest.approx(ours.compared_match_percent)


def test_the_vpdq_c_extension_is_not_required() -> None:
    # Screening never imports python-threatexchange or the vpdq extension.
    code = (
        "import sys, moderation.matching.screening; "
        "assert not any(m == 'vpdq' or m.startswith('threatexchange') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
