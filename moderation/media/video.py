"""Safe video decoding: untrusted MP4/MOV/WebM bytes -> sampled RGB frames (and vPDQ frames).

The video counterpart of :mod:`moderation.media.decode`, with PyAV (FFmpeg's libavformat and
libavcodec). A video is screened as the frames it shows: :func:`decode_video` decodes every
frame once, within limits, and keeps

- the **fixed-rate frames**: every ``frame_stride``-th decoded frame, vpdq's own sampling
  (:func:`frame_stride`, one per ``sample_interval_s``); each is handed to the caller's
  ``on_fixed_frame`` hook, which PDQ-hashes it into the video's vPDQ signature
  (:mod:`moderation.signals.vpdq`; this layer does not import the signals);
- the **scene-change frames**: a frame whose 32 x 32 greyscale thumbnail differs from the
  previous decoded frame's by at least ``scene_threshold`` (mean absolute difference, 0-255),
  so a photo shown for a fraction of a second between fixed-rate frames is still screened.

Both kinds go to the image pipeline (:class:`moderation.matching.screening.Screener`); when
they are more than ``screened_frames``, the frames most different from each other are kept
(:func:`moderation.media.frames.select_frames`, the same greedy farthest-point choice as for
animations), so the odd frame out survives the cut.

Safety, in order: byte size; magic bytes (:mod:`moderation.media.video_formats`) and the one
FFmpeg demuxer they name (no probing); the container's declared sizes against the data length
(truncation); exactly one video stream, of an allowed codec (:data:`ALLOWED_CODECS`); the
declared dimensions and duration before any frame is decoded (and FFmpeg's own ``max_pixels``
cap); then, for every decoded frame, its dimensions, its time (from the first frame's) against
the duration limit, the number of frames and the wall-clock decode budget. Decoding runs in
the calling thread, and any error the decoder logs (FFmpeg conceals damaged blocks and goes on)
makes the video ``corrupt``.

Reasons carried by :class:`~moderation.media.decode.UnscannableImage` for a video, beyond the
image reasons (``empty``, ``too_large``, ``truncated``, ``corrupt``, ``too_many_frames``):

``too_long``
    Declared duration, or a decoded frame's timestamp, past :attr:`VideoLimits.max_duration_s`.
``unsupported_codec``
    The video stream's codec is not in :data:`ALLOWED_CODECS`.
``no_video_stream``
    The container holds no video stream.
``multiple_video_streams``
    More than one video stream (cover art included): which one a player shows is its choice.
``decode_timeout``
    Decoding took longer than :attr:`VideoLimits.max_decode_s`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.media.decode import UnscannableImage
from moderation.media.frames import frame_thumbnail, select_frames
from moderation.media.video_formats import DEMUXERS, declared_past_end, sniff_video

if TYPE_CHECKING:
    from moderation.config import Settings

# PyAV (FFmpeg) is imported by the functions that decode: 0.1 s of start-up that image-only
# processes (``moderation screen`` of photos, the web tier) never need.

logger = logging.getLogger(__name__)

VIDEO_UNSCANNABLE_REASONS: tuple[str, ...] = (
    "too_long",
    "unsupported_codec",
    "no_video_stream",
    "multiple_video_streams",
    "decode_timeout",
)
"""Reasons only a video gets (documented in the module docstring)."""

ALLOWED_CODECS: Final = frozenset({"h264", "hevc", "mpeg4", "vp8", "vp9", "av1"})
"""FFmpeg decoder names of the video codecs that may be decoded (what phones, browsers and
editors write into MP4, MOV and WebM)."""

# Longer side of the frames handed to the image pipeline, px: PDQ downsamples to 512 anyway
# (moderation.signals.pdq.PDQ_DOWNSAMPLE_MAX_SIDE) and the encoders take 224 px.
_FRAME_MAX_SIDE: Final = 512
_THUMB_SIDE: Final = 32
# While decoding, the kept frames are cut back to ``screened_frames`` whenever they reach this
# many times it, bounding memory (512 px RGB: about 0.8 MB a frame).
_POOL_FACTOR: Final = 2


FrameHook = Callable[[int, float, Image.Image], None]
"""``(frame_number, frame_rate, image)``: see :func:`decode_video`'s ``on_fixed_frame``."""


def frame_stride(frame_rate: float, seconds_per_hash: float) -> int:
    """vpdq's ``frameMod``: every this-many-th decoded frame is a fixed-rate frame, at least 1
    (``max(1, int(seconds_per_hash * frame_rate))``, ThreatExchange
    ``vpdq/cpp/vpdq/cpp/hashing/filehasher.cpp``).

    Raises:
        ValueError: ``frame_rate`` or ``seconds_per_hash`` is not positive.
    """
    if not frame_rate > 0 or not seconds_per_hash > 0:
        raise ValueError(f"need positive rates, got {frame_rate} fps, {seconds_per_hash} s")
    return max(1, int(seconds_per_hash * frame_rate))


@dataclass(frozen=True)
class VideoLimits:
    """Resource limits and sampling for one video.

    Attributes:
        max_bytes: largest accepted file, bytes.
        max_duration_s: longest video, seconds (declared duration and decoded timestamps).
        max_frames: most frames decoded (all frames are decoded, for scene changes and vPDQ).
        max_side: longest accepted frame side, px.
        max_pixels: largest accepted frame, width x height px.
        max_decode_s: wall-clock budget for demuxing and decoding, seconds.
        screened_frames: most frames handed to the image pipeline.
        sample_interval_s: seconds between fixed-rate frames (vpdq's ``seconds_per_hash``).
        scene_threshold: mean absolute difference (0-255) of consecutive 32 x 32 greyscale
            thumbnails that marks a scene change.

    Raises:
        ValueError: a limit is not positive.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_duration_s: float = 300.0
    max_frames: int = 18_000
    max_side: int = 4096
    max_pixels: int = 4096 * 2304
    max_decode_s: float = 60.0
    screened_frames: int = 32
    sample_interval_s: float = 1.0
    scene_threshold: float = 30.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"VideoLimits.{field.name} must be > 0, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        """Limits from the ``max_video_*`` and ``video_*`` settings."""
        return cls(
            max_bytes=settings.max_video_bytes,
            max_duration_s=settings.max_video_duration_s,
            max_frames=settings.max_video_frames,
            max_side=settings.max_video_side,
            max_pixels=settings.max_video_pixels,
            max_decode_s=settings.max_video_decode_s,
            screened_frames=settings.video_screened_frames,
            sample_interval_s=settings.video_sample_interval_s,
            scene_threshold=settings.video_scene_threshold,
        )


DEFAULT_VIDEO_LIMITS: Final = VideoLimits()
"""The default limits (frozen, so one shared instance is safe as a default argument)."""


@dataclass(frozen=True)
class DecodedVideo:
    """A decoded video, ready for the image pipeline.

    Attributes:
        frames: the screened frames, mode RGB, upright (the display matrix's rotation
            applied), longer side at most 512 px, in time order.
        frame_indices: each screened frame's 0-based decoded frame number.
        timestamps: each screened frame's presentation time, seconds from the first frame's.
        scene_changes: frame numbers where a scene change was detected (screened or not).
        fixed_frames: frame numbers of the fixed-rate frames (those given to ``on_fixed_frame``).
        format: "MP4", "MOV" or "WEBM"; ``codec``: the FFmpeg decoder name.
        size: (width, height) px as stored; ``frame_rate``: frames per second.
        n_frames: frames decoded; ``duration_s``: the last frame's timestamp, seconds.
    """

    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    scene_changes: tuple[int, ...]
    fixed_frames: tuple[int, ...]
    format: str
    codec: str
    size: tuple[int, int]
    frame_rate: float
    n_frames: int
    duration_s: float


@dataclass
class _Sample:
    number: int
    timestamp: float
    image: Image.Image
    thumbnail: npt.NDArray[np.float32]


def decode_video(
    data: bytes,
    limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
    *,
    on_fixed_frame: FrameHook | None = None,
) -> DecodedVideo:
    """Decode untrusted video bytes into the frames to screen.

    Args:
        data: the whole file.
        limits: :class:`VideoLimits`.
        on_fixed_frame: called as ``(frame_number, frame_rate, image)`` for every fixed-rate
            frame, in order (``image``: RGB, longer side at most 512 px), e.g. to compute the
            vPDQ signature (:func:`moderation.signals.vpdq.hash_frame`) in the same pass.

    Raises:
        UnscannableImage: any input that cannot be decoded within ``limits``; ``reason`` is one
            of :data:`moderation.media.decode.UNSCANNABLE_REASONS` or
            :data:`VIDEO_UNSCANNABLE_REASONS`. No other exception escapes for bad input.
    """
    import av
    import av.error
    import av.logging

    fmt = _checked_container(data, limits)
    deadline = time.monotonic() + limits.max_decode_s
    if av.logging.get_level() is None:  # PyAV's default drops FFmpeg's messages unseen
        av.logging.set_level(av.logging.ERROR)
    # PyAV drops a message equal to the one before it, even from an earlier decode.
    av.logging.set_skip_repeated(False)
    try:
        with (
            av.logging.Capture(local=True) as messages,
            av.open(io.BytesIO(data), mode="r", format=DEMUXERS[fmt]) as container,
        ):
            decoded = _decode(container, fmt, limits, deadline, on_fixed_frame)
        _check_messages(messages, fmt)
        return decoded
    except UnscannableImage as exc:
        logger.debug("unscannable %s video: %s", fmt, exc)
        raise
    except (av.error.FFmpegError, ValueError, OverflowError, ZeroDivisionError) as exc:
        # FFmpegError covers InvalidDataError, EOFError, PatchWelcomeError, ...: all malformed
        # streams (the container was already checked for truncation).
        raise UnscannableImage("corrupt", f"{fmt}: {exc}") from exc
    except MemoryError as exc:
        raise UnscannableImage("too_large", f"out of memory while decoding: {exc}") from exc


def _check_messages(messages: list[tuple[int, str, str]], fmt: str) -> None:
    """Refuse a stream the decoder reported errors in: FFmpeg conceals damaged blocks (H.264
    "error while decoding MB") and goes on, so the frames would show concealment, not the
    upload."""
    import av.logging

    errors = [m for m in messages if m[0] <= av.logging.ERROR]
    if errors:
        _, name, text = errors[0]
        raise UnscannableImage(
            "corrupt", f"{fmt}: {name}: {text.strip()} ({len(errors)} decoder errors)"
        )


def _checked_container(data: bytes, limits: VideoLimits) -> str:
    """The container of ``data``, after the checks that need no decoder."""
    if not data:
        raise UnscannableImage("empty", "0 bytes")
    if len(data) > limits.max_bytes:
        raise UnscannableImage(
            "too_large", f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes"
        )
    fmt = sniff_video(data[:64])
    if fmt is None:
        raise UnscannableImage("unsupported_format", "not an MP4, MOV or WebM file")
    short = declared_past_end(data, fmt)
    if short is not None:
        raise UnscannableImage("truncated", f"{fmt}: {short}")
    return fmt


def _video_stream(container: Any, fmt: str, limits: VideoLimits) -> Any:
    """The container's one video stream, after the codec, dimension and duration checks."""
    streams = list(container.streams.video)
    if not streams:
        raise UnscannableImage("no_video_stream", f"{fmt} without a video stream")
    if len(streams) > 1:
        # Players choose which one to show; screening one could miss what the other shows.
        raise UnscannableImage("multiple_video_streams", f"{fmt} with {len(streams)} video streams")
    stream = streams[0]
    # Decode in the calling thread: the decoder's error messages are then captured for this
    # decode alone (av.logging.Capture(local=True)), and a worker process uses one core.
    stream.thread_type = "NONE"
    # FFmpeg's own cap on a frame's pixels, also for a size change mid-stream (the decoder
    # refuses the frame before allocating it; checked here too, on the header, first).
    stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        allowed = ", ".join(sorted(ALLOWED_CODECS))
        raise UnscannableImage("unsupported_codec", f"codec {codec!r} is not one of {allowed}")
    _check_dimensions(stream.codec_context.width, stream.codec_context.height, limits, "stream")
    duration = _declared_duration(container, stream)
    if duration is not None and duration > limits.max_duration_s:
        raise UnscannableImage(
            "too_long",
            f"declared duration {duration:.1f} s is over the limit of {limits.max_duration_s} s",
        )
    return stream


def _declared_duration(container: Any, stream: Any) -> float | None:
    """Seconds the container or stream header declares, or None."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        import av

        return float(container.duration) / av.time_base
    return None


def _check_dimensions(width: int, height: int, limits: VideoLimits, what: str) -> None:
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise UnscannableImage(
            "too_large",
            f"{what} is {width} x {height} px, over the limits of {limits.max_side} px a side "
            f"and {limits.max_pixels} px",
        )


def _frame_rate(stream: Any) -> float:
    """vpdq's frame rate: ``avg_frame_rate``, else ``r_frame_rate`` (``ffmpegwrapper.cpp``)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(Fraction(rate))
    raise UnscannableImage("corrupt", "the video stream has no frame rate")


def _decode(
    container: Any,
    fmt: str,
    limits: VideoLimits,
    deadline: float,
    on_fixed_frame: FrameHook | None,
) -> DecodedVideo:
    """Decode every frame of the video stream once, keeping the samples (see module doc)."""
    stream = _video_stream(container, fmt, limits)
    rate = _frame_rate(stream)
    stride = frame_stride(rate, limits.sample_interval_s)
    pool: list[_Sample] = []
    scenes: list[int] = []
    fixed_frames: list[int] = []
    previous: npt.NDArray[np.float32] | None = None
    number, timestamp, start = 0, 0.0, None
    for frame in container.decode(stream):
        _check_frame(frame, number, limits, deadline)
        shown_at = float(frame.time) if frame.time is not None else number / rate
        start = shown_at if start is None else start
        timestamp = _checked_time(shown_at - start, number, limits)
        grey = frame.reformat(width=_THUMB_SIDE, height=_THUMB_SIDE, format="gray")
        thumb = grey.to_ndarray().astype(np.float32)
        scene = previous is not None and float(np.abs(thumb - previous).mean()) >= (
            limits.scene_threshold
        )
        previous = thumb
        fixed = number % stride == 0
        if scene:
            scenes.append(number)
        if fixed or scene:
            image = _rgb(frame)
            if fixed:
                fixed_frames.append(number)
                if on_fixed_frame is not None:
                    on_fixed_frame(number, rate, image)
            pool.append(_Sample(number, timestamp, image, frame_thumbnail(image)))
            if len(pool) >= _POOL_FACTOR * limits.screened_frames:
                pool = _most_different(pool, limits.screened_frames)
        number += 1
    if number == 0:
        raise UnscannableImage("corrupt", f"{fmt}: no frame could be decoded")
    kept = _most_different(pool, limits.screened_frames)
    return DecodedVideo(
        frames=tuple(s.image for s in kept),
        frame_indices=tuple(s.number for s in kept),
        timestamps=tuple(s.timestamp for s in kept),
        scene_changes=tuple(scenes),
        fixed_frames=tuple(fixed_frames),
        format=fmt,
        codec=stream.codec_context.name,
        size=(stream.codec_context.width, stream.codec_context.height),
        frame_rate=rate,
        n_frames=number,
        duration_s=timestamp,
    )


def _checked_time(timestamp: float, number: int, limits: VideoLimits) -> float:
    """A frame's time from the first frame's (a container may start its clock anywhere),
    seconds, within the duration limit."""
    if timestamp > limits.max_duration_s:
        raise UnscannableImage(
            "too_long", f"frame {number} at {timestamp:.1f} s is past {limits.max_duration_s} s"
        )
    return timestamp


def _check_frame(frame: Any, number: int, limits: VideoLimits, deadline: float) -> None:
    """Per-frame limits: count, dimensions (they may change mid-stream), decode budget."""
    if number >= limits.max_frames:
        raise UnscannableImage("too_many_frames", f"more than {limits.max_frames} frames")
    _check_dimensions(frame.width, frame.height, limits, f"frame {number}")
    if time.monotonic() > deadline:
        raise UnscannableImage(
            "decode_timeout",
            f"decoding took over {limits.max_decode_s} s (stopped at frame {number})",
        )


# Quarter turns counter-clockwise -> the Pillow transpose doing them (a phone's portrait video
# is stored sideways with a display matrix, as a JPEG with an EXIF orientation).
_QUARTER_TURNS: Final = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


def _rgb(frame: Any) -> Image.Image:
    """The frame as an RGB image, upright, longer side at most :data:`_FRAME_MAX_SIDE` px
    (bicubic).

    Upright: turned by the stream's display matrix (PyAV ``VideoFrame.rotation``, degrees
    counter-clockwise; ``av_display_rotation_get``), as players and FFmpeg's ``autorotate``
    show it. Rotations that are not quarter turns are rounded to the nearest one.
    """
    width, height = frame.width, frame.height
    scale = min(1.0, _FRAME_MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image: Image.Image = frame.reformat(
        width=size[0], height=size[1], format="rgb24", interpolation="BICUBIC"
    ).to_image()
    turn = _QUARTER_TURNS.get(round((frame.rotation or 0) / 90) % 4)
    return image if turn is None else image.transpose(turn)


def _most_different(pool: list[_Sample], count: int) -> list[_Sample]:
    """At most ``count`` samples in time order: all of them, or the most different ones."""
    if len(pool) <= count:
        return pool
    chosen = select_frames(np.stack([s.thumbnail for s in pool]), count)
    return [pool[i] for i in chosen]
