"""vPDQ video signatures: per-frame PDQ hashes, quality and timestamp, in ThreatExchange's forms.

vPDQ (ThreatExchange ``vpdq/README.md``) hashes every frame at a fixed interval of a video with
PDQ and treats the result as an unordered bag of frame hashes. This module computes the same
features from frames a caller has decoded (:mod:`moderation.media.video` decodes with PyAV),
writes and reads both exchange forms, and implements the reference match rule:

- **Sampling**: the reference hasher (``vpdq/cpp/vpdq/cpp/hashing/filehasher.cpp``) keeps the
  decoded frames whose 0-based number ``n`` satisfies ``n % frame_mod == 0`` with
  ``frame_mod = max(1, int(seconds_per_hash * frame_rate))``
  (:func:`moderation.media.video.frame_stride`), and stamps
  each ``n / frame_rate`` seconds (``hasher.h`` ``hashFrame``). The frame rate is the stream's
  ``avg_frame_rate``, else ``r_frame_rate`` (``ffmpegwrapper.cpp``).
- **Hashing**: PDQ of the RGB frame (:func:`moderation.signals.pdq.pdq_hash`). The reference
  hashes the frame at full size; frames larger than
  :data:`moderation.signals.pdq.PDQ_DOWNSAMPLE_MAX_SIDE` are downsampled first here, as for
  images (ThreatExchange's PDQ tools do the same), which moves a hash by a few bits at most.
- **File form** (``vpdq/cpp/vpdq/cpp/io/vpdqio.cpp``, ``vpdq/sample-hashes/*.txt``): one line
  per frame, ``frame_number,quality,pdq_hex,timestamp_seconds`` with the timestamp fixed to 3
  decimals (:func:`to_file_text`, :func:`parse_file_text`).
- **Signal form** (python-threatexchange ``threatexchange/extensions/vpdq/vpdq_util.py``,
  ``VpdqCompactFeature`` and ``vpdq_to_json``; what ``VPDQSignal`` exchanges and HMA stores): a
  JSON list of ``"pdq_hex,quality,timestamp"`` strings, the timestamp written with Python's
  ``format(t, ".3")`` (three *significant* digits: ``12.345`` -> ``"12.3"``), which this module
  reproduces for byte-identical output (:func:`to_signal_str`, :func:`parse_signal_str`).
- **Matching** (``vpdq_brute_matcher.match_VPDQ_hash_brute`` and ``vpdq/README.md``): both sides
  are deduplicated (exactly equal hashes kept once, first occurrence) and filtered to quality
  >= :data:`VPDQ_QUALITY_THRESHOLD`; the query match percentage is the share of query frames
  within :data:`VPDQ_DISTANCE_THRESHOLD` bits of some compared frame, and the compared match
  percentage the reverse (:func:`match_features`). ``VPDQSignal.compare_hash`` calls it a match
  when the query percentage reaches :data:`VPDQ_QUERY_MATCH_THRESHOLD_PERCENT` and the compared
  one :data:`VPDQ_INDEX_MATCH_THRESHOLD_PERCENT` (:meth:`VpdqMatch.is_match`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.signals.pdq import pdq_hash

#: Frames below this PDQ quality are not compared (``VPDQ_QUALITY_THRESHOLD`` in
#: python-threatexchange ``vpdq_util.py``; ``vpdq/README.md`` example F = 50).
VPDQ_QUALITY_THRESHOLD: Final = 50
#: Two frames match at or below this Hamming distance, bits (``VPDQ_DISTANCE_THRESHOLD``).
VPDQ_DISTANCE_THRESHOLD: Final = 31
#: ``VPDQSignal.compare_hash``'s defaults: share of the query's frames that must match, percent.
VPDQ_QUERY_MATCH_THRESHOLD_PERCENT: Final = 80.0
#: ... and of the compared (indexed) video's frames, percent.
VPDQ_INDEX_MATCH_THRESHOLD_PERCENT: Final = 0.0
#: Seconds between hashed frames: the reference CLI's and ``VPDQSignal.hash_from_file``'s default.
VPDQ_SECONDS_PER_HASH: Final = 1.0

_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VpdqFeature:
    """One hashed frame.

    Attributes:
        frame_number: 0-based decoded frame number (the signal form has none: parsing it gives
            the feature's position in the list).
        quality: PDQ quality, 0-100.
        pdq_hex: the frame's PDQ hash, 64 lowercase hex characters (ThreatExchange's order).
        timestamp: seconds from the start of the video, >= 0.

    Raises:
        ValueError: a field is out of range or the hash is not 64 hex characters (the checks
            of ``VpdqCompactFeature.assert_valid``).
    """

    frame_number: int
    quality: int
    pdq_hex: str
    timestamp: float

    def __post_init__(self) -> None:
        if _HEX_RE.fullmatch(self.pdq_hex) is None:
            raise ValueError(f"a vPDQ frame hash is 64 lowercase hex digits: {self.pdq_hex!r}")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"vPDQ quality must be in 0-100, got {self.quality}")
        if not self.timestamp >= 0:  # also refuses NaN
            raise ValueError(f"vPDQ timestamp must be >= 0 s, got {self.timestamp}")
        if self.frame_number < 0:
            raise ValueError(f"vPDQ frame number must be >= 0, got {self.frame_number}")


def hash_frame(frame_number: int, frame_rate: float, image: Image.Image) -> VpdqFeature:
    """The feature of decoded frame ``frame_number`` (``image``: mode RGB), stamped
    ``frame_number / frame_rate`` s as the reference does."""
    digest = pdq_hash(image)
    return VpdqFeature(frame_number, digest.quality, digest.hex, frame_number / frame_rate)


class VpdqCollector:
    """Collects a video's features frame by frame: pass it as
    :func:`moderation.media.video.decode_video`'s ``on_fixed_frame`` hook, then read
    :attr:`features`."""

    def __init__(self) -> None:
        self.features: list[VpdqFeature] = []

    def __call__(self, frame_number: int, frame_rate: float, image: Image.Image) -> None:
        """Hash one fixed-rate frame (:func:`hash_frame`)."""
        self.features.append(hash_frame(frame_number, frame_rate, image))


# --- exchange forms ---------------------------------------------------------------------------


def to_file_text(features: Iterable[VpdqFeature]) -> str:
    """The reference hasher's output file: ``frame_number,quality,pdq_hex,timestamp`` lines,
    timestamp to 3 decimals (``vpdqio.cpp`` ``outputVPDQFeatureToFile``)."""
    return "".join(
        f"{f.frame_number},{f.quality},{f.pdq_hex},{f.timestamp:.3f}\n" for f in features
    )


def parse_file_text(text: str) -> list[VpdqFeature]:
    """Features from the reference file form; blank lines are skipped.

    Raises:
        ValueError: a line is not four comma-separated valid fields (the line number is named).
    """
    features = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        try:
            frame, quality, pdq_hex, timestamp = parts
            features.append(VpdqFeature(int(frame), int(quality), pdq_hex, float(timestamp)))
        except ValueError as exc:
            raise ValueError(f"vPDQ line {number}: {line.strip()[:120]!r}: {exc}") from exc
    return features


def _compact(feature: VpdqFeature) -> str:
    # VpdqCompactFeature.__str__: f"{pdq_hex},{quality},{timestamp:.3}" (3 significant digits).
    return f"{feature.pdq_hex},{feature.quality},{feature.timestamp:.3}"


def to_signal_str(features: Iterable[VpdqFeature]) -> str:
    """python-threatexchange's ``VPDQSignal`` string: ``json.dumps`` of the compact features."""
    return json.dumps([_compact(f) for f in features])


def parse_signal_str(text: str) -> list[VpdqFeature]:
    """Features from a ``VPDQSignal`` string (``json_to_vpdq``; an empty string is no frames).

    Raises:
        ValueError: not a JSON list of ``"pdq_hex,quality,timestamp"`` strings with valid values.
    """
    try:
        items = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"a vPDQ signal is a JSON list: {exc}") from exc
    if not isinstance(items, list):
        raise ValueError("a vPDQ signal is a JSON list of strings")
    features = []
    for position, item in enumerate(items):
        try:
            if not isinstance(item, str):
                raise ValueError("not a string")
            pdq_hex, quality, timestamp = item.split(",")
            features.append(VpdqFeature(position, int(quality), pdq_hex, float(timestamp)))
        except ValueError as exc:
            raise ValueError(f"invalid vPDQ feature {position}: {str(item)[:100]!r}") from exc
    return features


# --- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VpdqMatch:
    """``VPDQMatchResult``: percentages (0-100) of each side's usable frames that match."""

    query_match_percent: float
    compared_match_percent: float

    def is_match(
        self,
        query_threshold: float = VPDQ_QUERY_MATCH_THRESHOLD_PERCENT,
        compared_threshold: float = VPDQ_INDEX_MATCH_THRESHOLD_PERCENT,
    ) -> bool:
        """``VPDQSignal.compare_hash``'s rule: both percentages reach their thresholds."""
        return (
            self.query_match_percent >= query_threshold
            and self.compared_match_percent >= compared_threshold
        )


def usable(
    features: Sequence[VpdqFeature], quality_threshold: int = VPDQ_QUALITY_THRESHOLD
) -> list[VpdqFeature]:
    """``dedupe`` then ``quality_filter``: each distinct hash once (first occurrence), quality
    at or above ``quality_threshold``."""
    seen: set[str] = set()
    kept = []
    for feature in features:
        if feature.pdq_hex not in seen:
            seen.add(feature.pdq_hex)
            if feature.quality >= quality_threshold:
                kept.append(feature)
    return kept


def _digests(features: Sequence[VpdqFeature]) -> npt.NDArray[np.uint8]:
    return np.frombuffer(b"".join(bytes.fromhex(f.pdq_hex) for f in features), np.uint8).reshape(
        -1, 32
    )


def distance_matrix(
    query: Sequence[VpdqFeature], compared: Sequence[VpdqFeature]
) -> npt.NDArray[np.int64]:
    """``(len(query), len(compared))`` int64 Hamming distances, bits."""
    a, b = _digests(query), _digests(compared)
    xor = np.bitwise_xor(a[:, None, :], b[None, :, :])
    distances: npt.NDArray[np.int64] = np.bitwise_count(xor).sum(axis=2, dtype=np.int64)
    return distances


def match_features(
    query: Sequence[VpdqFeature],
    compared: Sequence[VpdqFeature],
    *,
    quality_threshold: int = VPDQ_QUALITY_THRESHOLD,
    distance_threshold: int = VPDQ_DISTANCE_THRESHOLD,
) -> VpdqMatch:
    """``match_VPDQ_hash_brute``: how much of each video matches the other.

    A side left with no usable frame scores 0 % (the reference divides by zero there).
    """
    q, c = usable(query, quality_threshold), usable(compared, quality_threshold)
    if not q or not c:
        return VpdqMatch(0.0, 0.0)
    close = distance_matrix(q, c) <= distance_threshold
    return VpdqMatch(
        float(close.any(axis=1).sum()) * 100 / len(q),
        float(close.any(axis=0).sum()) * 100 / len(c),
    )
