"""Short real video clips for the video tests, encoded with PyAV from scikit-image's photos.

:func:`clip` shows a list of (photo, seconds) segments at a frame rate; each segment is the photo
with a slow horizontal pan (so consecutive frames differ a little, as in real footage), encoded
with a real codec into a real container.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageEnhance

from tests.conftest import skimage_photo

# (container format, codec, PyAV pixel format) per test container.
CODECS = {
    "mp4": ("mp4", "h264", "yuv420p"),
    "mp4v": ("mp4", "mpeg4", "yuv420p"),
    "webm": ("webm", "libvpx", "yuv420p"),
    "mov": ("mov", "h264", "yuv420p"),
}
SIZE = (320, 240)


def photo(name: str, size: tuple[int, int] = SIZE) -> Image.Image:
    """A scikit-image photo resized to ``size``."""
    return skimage_photo(name).resize(size, Image.Resampling.BICUBIC)


def edited(image: Image.Image) -> Image.Image:
    """An edited copy: 10 % cropped from each side, brighter, resized back."""
    w, h = image.size
    cropped = image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize(image.size)
    return ImageEnhance.Brightness(cropped).enhance(1.2)


def recoloured(image: Image.Image) -> Image.Image:
    """An edit PDQ is robust to (it is not to crops): brighter and more contrasted."""
    return ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.15)).enhance(1.1)


def _pan(image: Image.Image, step: int) -> Image.Image:
    """``image`` shifted ``step`` px left (edge repeated): a slow camera pan."""
    array = np.asarray(image)
    shifted = np.concatenate([array[:, step:], np.repeat(array[:, -1:], step, axis=1)], axis=1)
    return Image.fromarray(shifted)


def encode(
    fmt: str,
    codec: str,
    images: Sequence[Image.Image],
    *,
    fps: int = 5,
    streams: int = 1,
    pix_fmt: str | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    first_pts: int = 0,
) -> bytes:
    """``images`` as the frames of ``streams`` video streams (each the same) with PyAV's
    ``codec`` in container ``fmt``; ``rotation``: a display matrix (degrees counter-clockwise);
    ``first_pts``: the first frame's presentation time, in frames."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt, options=options or {}) as container:
        made = []
        for _ in range(streams):
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = images[0].size
            stream.time_base = Fraction(1, fps)
            stream.codec_context.thread_count = 1  # the same bytes on every run
            if pix_fmt is not None:
                stream.pix_fmt = pix_fmt
            if rotation is not None:
                stream.set_display_rotation(rotation)
            made.append(stream)
        for number, image in enumerate(images):
            for stream in made:
                frame = av.VideoFrame.from_image(image)
                frame.pts = first_pts + number
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in made:
            for packet in stream.encode():
                container.mux(packet)
    return out.getvalue()


def clip(
    segments: Sequence[tuple[Image.Image, float]],
    kind: str = "mp4",
    fps: int = 10,
) -> bytes:
    """Encode ``segments`` (image, seconds) as one clip of ``kind`` (see :data:`CODECS`)."""
    fmt, codec, pix_fmt = CODECS[kind]
    frames = [
        _pan(image, step) for image, seconds in segments for step in range(round(seconds * fps))
    ]
    return encode(fmt, codec, frames, fps=fps, pix_fmt=pix_fmt)


def solid(count: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """``count`` plain frames, each a different red."""
    return [Image.new("RGB", size, (n * 40 % 256, 0, 0)) for n in range(count)]
