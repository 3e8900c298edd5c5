"""Video uploads in the screening pipeline: decode into frames for the image path, and explain.

:class:`moderation.matching.screening.Screener` hands an upload whose magic bytes are a video
container (:func:`is_video`) to :func:`decode_video_upload` instead of the image decoder. The
video's screened frames (:mod:`moderation.media.video`: fixed-rate and scene-change frames) then
go through exactly the image pipeline (PDQ with its dihedral variants, one batched encoder call
for all frames of the batch, bank search, classifier stage, policy): the candidate search keeps,
per bank entry, its best frame, so the decision is the strongest frame's. :func:`with_timestamps`
stamps each match with the time of the frame it matched on, and :func:`video_explanation` adds
what was decoded and sampled to the result's explanation. The vPDQ signature of the fixed-rate
frames (:mod:`moderation.signals.vpdq`) is computed in the same decoding pass and matched
against the bank's vPDQ entries (video signatures from hash lists) with python-threatexchange's
rule (:func:`moderation.matching.candidates.vpdq_candidates`; the policy's ``*_vpdq_percent``
thresholds decide).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from moderation.matching.decision import MatchResult
from moderation.media.decode import DecodedImage
from moderation.media.video import DecodedVideo, VideoLimits, decode_video
from moderation.media.video_formats import SNIFF_BYTES, sniff_video
from moderation.signals.vpdq import VpdqCollector, VpdqFeature


def is_video(data: bytes) -> bool:
    """Whether ``data`` starts like an accepted video container (MP4, MOV, WebM)."""
    return sniff_video(data[:SNIFF_BYTES]) is not None


@dataclass(frozen=True)
class VideoUpload:
    """A decoded video upload: its decode, and its vPDQ signature (fixed-rate frames)."""

    decoded: DecodedVideo
    vpdq: tuple[VpdqFeature, ...]

    def as_image(self) -> DecodedImage:
        """The screened frames in the image pipeline's form (``frame_indices``: decoded frame
        numbers; ``n_frames``: frames decoded)."""
        video = self.decoded
        return DecodedImage(
            frames=video.frames,
            frame_indices=video.frame_indices,
            format=video.format,
            size=video.size,
            n_frames=video.n_frames,
        )


def decode_video_upload(data: bytes, limits: VideoLimits) -> VideoUpload:
    """Decode ``data`` and compute its vPDQ signature in one pass.

    Raises:
        moderation.media.decode.UnscannableImage: as :func:`moderation.media.video.decode_video`.
    """
    collector = VpdqCollector()
    decoded = decode_video(data, limits, on_fixed_frame=collector)
    return VideoUpload(decoded, tuple(collector.features))


def with_timestamps(video: VideoUpload, matches: Sequence[MatchResult]) -> list[MatchResult]:
    """``matches`` with ``timestamp_s`` set to the time (s) of the screened frame each matched
    (none for an exact-hash match, whose whole file is on a list, nor a vPDQ match, which is of
    the whole video)."""
    times = video.decoded.timestamps
    return [
        m
        if m.exact is not None or m.vpdq is not None
        else replace(m, timestamp_s=round(times[m.frame], 3))
        for m in matches
    ]


def video_explanation(video: VideoUpload, matches: Sequence[MatchResult]) -> dict[str, Any]:
    """The explanation's ``video`` object: container, codec, size, frame rate, duration (s),
    frames decoded, the screened frames' numbers and times (s), the scene changes, the vPDQ
    frame count, and ``matched_frame`` (frame number and time of the top match's frame) when
    something matched."""
    decoded = video.decoded
    explained: dict[str, Any] = {
        "format": decoded.format,
        "codec": decoded.codec,
        "size": list(decoded.size),
        "frame_rate": round(decoded.frame_rate, 3),
        "duration_s": round(decoded.duration_s, 3),
        "frames_decoded": decoded.n_frames,
        "screened_frames": list(decoded.frame_indices),
        "screened_timestamps_s": [round(t, 3) for t in decoded.timestamps],
        "scene_changes": list(decoded.scene_changes[:100]),
        "vpdq_frames": len(video.vpdq),
    }
    if matches and matches[0].exact is None:
        top = matches[0]
        explained["matched_frame"] = {
            "frame": decoded.frame_indices[top.frame],
            "timestamp_s": round(decoded.timestamps[top.frame], 3),
        }
    return explained
