"""Safe video decoding (moderation.media.video): sampling, containers, limits, broken files.

Every clip is real: scikit-image photos encoded with PyAV (H.264, MPEG-4 Part 2, VP8) into
MP4, MOV and WebM (tests/video_clips.py).
"""

from __future__ import annotations

import io
import struct

import av
import pytest
from PIL import Image

from moderation.media.decode import UNSCANNABLE_REASONS, UnscannableImage
from moderation.media.video import (
    DEFAULT_VIDEO_LIMITS,
    VIDEO_UNSCANNABLE_REASONS,
    VideoLimits,
    decode_video,
    frame_stride,
)
from moderation.media.video_formats import sniff_video
from tests.video_clips import clip, encode, photo, solid

# coffee 1.5 s, astronaut 0.4 s (frames 15-18 at 10 fps: between the 1 s fixed-rate frames
# 10 and 20), rocket 1.5 s.
FLASH = [(photo("coffee"), 1.5), (photo("astronaut"), 0.4), (photo("rocket"), 1.5)]


def reason(data: bytes, limits: VideoLimits = DEFAULT_VIDEO_LIMITS) -> str:
    with pytest.raises(UnscannableImage) as caught:
        decode_video(data, limits)
    assert caught.value.reason in UNSCANNABLE_REASONS + VIDEO_UNSCANNABLE_REASONS
    return caught.value.reason


@pytest.fixture(scope="module")
def flash_mp4() -> bytes:
    return clip(FLASH, "mp4")


@pytest.mark.parametrize(
    ("kind", "container", "codec"),
    [
        ("mp4", "MP4", "h264"),
        ("mp4v", "MP4", "mpeg4"),
        ("webm", "WEBM", "vp8"),
        ("mov", "MOV", "h264"),
    ],
)
def test_each_container_decodes_with_fixed_rate_and_scene_change_frames(
    kind: str, container: str, codec: str
) -> None:
    data = clip(FLASH, kind)
    assert sniff_video(data[:64]) == container
    fixed: list[tuple[int, float]] = []
    video = decode_video(data, on_fixed_frame=lambda n, rate, image: fixed.append((n, rate)))
    assert (video.format, video.codec, video.size) == (container, codec, (320, 240))
    assert video.n_frames == 34 and video.frame_rate == pytest.approx(10.0)
    # vpdq's sampling: every 10th frame at 10 fps and 1 s a hash.
    assert fixed == [(0, 10.0), (10, 10.0), (20, 10.0), (30, 10.0)]
    assert video.fixed_frames == (0, 10, 20, 30)
    # The cuts to the astronaut (frame 15) and away from it (frame 19) are scene changes.
    assert video.scene_changes == (15, 19)
    assert video.frame_indices == (0, 10, 15, 19, 20, 30)
    assert video.timestamps == pytest.approx((0.0, 1.0, 1.5, 1.9, 2.0, 3.0))
    for frame in video.frames:
        assert frame.mode == "RGB" and frame.size == (320, 240)


def test_the_flashed_frame_is_the_photo(flash_mp4: bytes) -> None:
    video = decode_video(flash_mp4)
    shown = video.frames[video.frame_indices.index(15)]
    reference = photo("astronaut").resize((32, 24), Image.Resampling.BOX)
    diff = [
        abs(a - b)
        for a, b in zip(shown.resize((32, 24)).tobytes(), reference.tobytes(), strict=True)
    ]
    assert sum(diff) / len(diff) < 12  # H.264 at its default quality


def test_a_sideways_phone_video_is_screened_upright() -> None:
    # Stored sideways (turned 90 degrees counter-clockwise) with a display matrix saying
    # "turn 90 degrees clockwise to show", as phones record portrait video.
    upright = photo("astronaut", (240, 320))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = encode("mp4", "mpeg4", [stored], rotation=-90)
    [frame] = decode_video(data).frames
    assert frame.size == (240, 320)
    diff = [
        abs(a - b)
        for a, b in zip(
            frame.resize((24, 32)).tobytes(), upright.resize((24, 32)).tobytes(), strict=True
        )
    ]
    assert sum(diff) / len(diff) < 12


def test_too_many_samples_keep_the_most_different_frames(flash_mp4: bytes) -> None:
    video = decode_video(flash_mp4, VideoLimits(screened_frames=3))
    assert len(video.frames) == 3
    assert video.frame_indices[0] == 0
    # The flashed photo is unlike every other frame, so it survives the cut.
    assert 15 in video.frame_indices or 19 in video.frame_indices


def test_frame_stride_is_vpdq_frame_mod() -> None:
    assert frame_stride(29.97, 1.0) == 29
    assert frame_stride(10.0, 0.05) == 1
    with pytest.raises(ValueError):
        frame_stride(0.0, 1.0)


# --- limits ---------------------------------------------------------------------------------


def test_duration_limit(flash_mp4: bytes) -> None:
    assert reason(flash_mp4, VideoLimits(max_duration_s=2.0)) == "too_long"


def test_duration_limit_on_decoded_timestamps_without_a_declared_duration() -> None:
    # A WebM written to a non-seekable stream carries no duration: the frames' times decide.
    data = encode("webm", "libvpx", solid(40), fps=10, options={"live": "1"})
    assert decode_video(data).n_frames == 40
    assert reason(data, VideoLimits(max_duration_s=2.0)) == "too_long"


def test_times_count_from_the_first_frame() -> None:
    # A WebM whose clock starts at 400 s: 4 s long, not 404 s.
    data = encode("webm", "libvpx", solid(20), fps=5, options={"live": "1"}, first_pts=2000)
    video = decode_video(data, VideoLimits(max_duration_s=10.0))
    assert video.timestamps[0] == 0.0 and video.duration_s == pytest.approx(3.8)


def test_frame_count_limit(flash_mp4: bytes) -> None:
    assert reason(flash_mp4, VideoLimits(max_frames=20)) == "too_many_frames"


def test_byte_limit(flash_mp4: bytes) -> None:
    assert reason(flash_mp4, VideoLimits(max_bytes=len(flash_mp4) - 1)) == "too_large"


def test_absurd_dimensions_are_refused_before_decoding(flash_mp4: bytes) -> None:
    assert reason(flash_mp4, VideoLimits(max_side=300)) == "too_large"
    assert reason(flash_mp4, VideoLimits(max_pixels=320 * 240 - 1)) == "too_large"


def test_decode_budget(flash_mp4: bytes) -> None:
    assert reason(flash_mp4, VideoLimits(max_decode_s=1e-9)) == "decode_timeout"


# --- broken and refused files ---------------------------------------------------------------


def test_truncated_files_are_unscannable(flash_mp4: bytes) -> None:
    for data in (flash_mp4, clip(FLASH, "webm"), clip(FLASH, "mov")):
        for cut in (len(data) // 3, len(data) - 100):
            assert reason(data[:cut]) == "truncated"


def _mdat(data: bytes) -> tuple[int, int]:
    """(start, end) of the mdat box's payload (the coded frames)."""
    at = data.index(b"mdat") - 4
    return at + 8, at + struct.unpack_from(">I", data, at)[0]


def test_garbage_frames_are_corrupt(flash_mp4: bytes) -> None:
    start, end = _mdat(flash_mp4)
    garbage = bytes((i * 37 + 11) % 256 for i in range(end - start - 200))
    assert reason(flash_mp4[: start + 200] + garbage + flash_mp4[end:]) == "corrupt"


def test_damaged_blocks_the_decoder_conceals_are_corrupt(flash_mp4: bytes) -> None:
    # 100 bytes flipped at four places in the coded frames: H.264 conceals the damaged
    # macroblocks and goes on, reporting it only in its log; the upload is corrupt, not allowed.
    start, end = _mdat(flash_mp4)
    damaged = bytearray(flash_mp4)
    for quarter in range(4):
        at = start + (end - start) * (2 * quarter + 1) // 8
        for k in range(at, at + 100):
            damaged[k] ^= 0x5A
    assert decode_video(flash_mp4).n_frames == 34
    assert reason(bytes(damaged)) == "corrupt"


def test_header_only_and_random_bytes() -> None:
    assert reason(b"") == "empty"
    assert reason(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") in ("corrupt", "truncated")
    assert reason(b"not a video at all, just text") == "unsupported_format"


def test_a_disallowed_codec_is_refused() -> None:
    data = encode("mov", "mjpeg", solid(5), pix_fmt="yuvj420p")
    assert reason(data) == "unsupported_codec"


def test_audio_only_file_has_no_video_stream() -> None:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert reason(out.getvalue()) == "no_video_stream"


def test_a_second_video_stream_is_refused() -> None:
    assert reason(encode("mp4", "mpeg4", solid(5), streams=2)) == "multiple_video_streams"


def test_matroska_other_than_webm_is_not_sniffed() -> None:
    data = encode("matroska", "mpeg4", solid(1))
    assert sniff_video(data[:64]) is None
    assert reason(data) == "unsupported_format"
