"""Safe image decoding: untrusted bytes -> RGB frames, or :class:`UnscannableImage`.

This is the first stage of the pipeline (decode -> embed -> search -> classify -> decide). Every
upload passes through :func:`decode_image` (or :func:`decode_file`), so it follows Pillow's own
security guidance (https://pillow.readthedocs.io/en/stable/handbook/security.html and
``reference/open_files.html``) and the RELIABILITY.md rows I1-I10:

- Only the formats in :data:`moderation.media.formats.ALLOWED_FORMATS` are parsed: the magic
  bytes are checked first (:func:`moderation.media.formats.sniff_format`) and the same list is
  passed to ``Image.open(formats=...)``. Nothing here spawns a process (Pillow's EPS plugin
  would run Ghostscript).
- The byte size is checked before parsing; the dimensions declared in the header are checked
  against :attr:`DecodeLimits.max_pixels` before any pixel is decoded.
- ``PIL.Image.MAX_IMAGE_PIXELS`` is left at its default and ``DecompressionBombWarning`` is
  raised as an error, inside a local ``warnings.catch_warnings()`` (global filters untouched).
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off: a truncated file is unscannable, not half-read.
- Decoder failures are caught broadly and classified. The exception list is the one Pillow's
  OSS-Fuzz harness accepts as "handled" (``Tests/oss-fuzz/fuzzers.py`` in python-pillow/Pillow:
  OSError, SyntaxError, MemoryError, ValueError, NotImplementedError, OverflowError,
  DecompressionBombError/Warning, UnidentifiedImageError; ``Image.open`` can leak a raw
  ValueError, Pillow #9814) plus struct.error, IndexError, KeyError, EOFError and TypeError,
  which broken plugins raise. Any other exception type is a bug and is not swallowed.
- EXIF orientation is applied (Pillow does not do it for JPEG, PNG or WebP).
- Animations: too many frames is unscannable; otherwise the frames most different from each
  other are returned, so one odd frame hidden in a benign animation is screened (I6).

Reasons carried by :class:`UnscannableImage` (``reason`` is stable, for metrics and policies):

``empty``
    0 bytes.
``too_large``
    More bytes than :attr:`DecodeLimits.max_bytes`; a frame declaring more pixels than
    :attr:`DecodeLimits.max_pixels` (or Pillow's own ``MAX_IMAGE_PIXELS``, whichever is lower);
    an animation whose frames add up to more than :attr:`DecodeLimits.max_total_pixels`; or the
    decoder ran out of memory.
``bomb``
    A compressed block inside the file (PNG zTXt/iTXt/iCCP text or profile chunks) inflates past
    Pillow's safety limit (``PngImagePlugin.MAX_TEXT_CHUNK``, ``MAX_TEXT_MEMORY``).
``unsupported_format``
    The magic bytes are not one of :data:`moderation.media.formats.ALLOWED_FORMATS` (EPS, PSD,
    FITS, PDF, SVG, HTML, random bytes, ...), or an allowed container holds a pixel layout
    Pillow cannot decode (for example planar float64 TIFF).
``truncated``
    The data ends before the decoder is done (Pillow's "image file is truncated", EOFError, or a
    WebP/TIFF/BMP header that declares more data than there is).
``corrupt``
    An allowed format whose header or compressed data is malformed.
``too_many_frames``
    More frames than :attr:`DecodeLimits.max_frames`.
``unreadable``
    :func:`decode_file` only: the path is missing, not a regular file, or cannot be read.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile

from moderation.media.formats import (
    ALLOWED_FORMATS,
    DECODER_ERRORS,
    classify_failure,
    sniff_format,
    tiff_data_ends,
)
from moderation.media.frames import count_frames, frame_thumbnail, select_frames
from moderation.media.pixels import ORIENTATION_TRANSPOSE, to_rgb, upright

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

UNSCANNABLE_REASONS: tuple[str, ...] = (
    "empty",
    "too_large",
    "bomb",
    "unsupported_format",
    "truncated",
    "corrupt",
    "too_many_frames",
    "unreadable",
)
"""Every value :attr:`UnscannableImage.reason` takes (documented in the module docstring)."""

# Pillow's default MAX_IMAGE_PIXELS (PIL/Image.py: 1024 * 1024 * 1024 // 4 // 3, about 89.5 Mpx,
# a 0.25 GiB RGB bitmap), used only if a caller has disabled Pillow's global limit.
_PILLOW_DEFAULT_MAX_PIXELS: Final = 1024 * 1024 * 1024 // 4 // 3
_PILLOW_MAX_PIXELS: Final[int] = Image.MAX_IMAGE_PIXELS or _PILLOW_DEFAULT_MAX_PIXELS

# Frames of an animation decoded in the first pass are kept (as RGB) while their pixels add up to
# at most this; past it they are dropped and the chosen frames decoded again (second pass).
# 32 Mpx is 96 MiB of RGB: a typical GIF (100 frames of 480 x 270 = 13 Mpx) stays in one pass.
_RETAIN_PIXELS: Final = 32 * 1024 * 1024


class UnscannableImage(Exception):
    """The input cannot be screened; the policy decides review or block (never allow).

    Attributes:
        reason: one of :data:`UNSCANNABLE_REASONS`, short and machine-readable.
        detail: human-readable explanation (Pillow's message where there is one).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class DecodeLimits:
    """Resource limits for one decode.

    Attributes:
        max_bytes: largest accepted input, bytes (checked before parsing).
        max_pixels: largest frame, width x height px, checked on the declared header size
            before decoding. Pillow's ``Image.MAX_IMAGE_PIXELS`` (default about 89.5 Mpx) also
            applies, because its ``DecompressionBombWarning`` is raised as an error: the
            effective cap is the lower of the two.
        max_frames: an animation or multipage file with more frames is ``too_many_frames``.
        sampled_frames: at most this many frames are returned for screening.
        max_total_pixels: cap on the sum of width x height over every frame decoded, px.
            Choosing frames needs each frame decoded once, so this bounds the work per upload.
            The default is twice Pillow's ``MAX_IMAGE_PIXELS`` (about 179 Mpx, for example 1000
            frames of 480 x 360). Measured on one core: 4.1 s for 1000 GIF frames of 480 x 360
            (173 Mpx; bare Pillow seek and load takes 1.5 s of that); 5.6 s for a 2.8 KB
            mutated WebP declaring three 2097448 x 28 frames (176 Mpx), all of it in Pillow's
            WebP decoder. Lower this to cut the worst case. When more than ``sampled_frames``
            frames exist and they add up to over 32 Mpx, the chosen ones are decoded again.

    Raises:
        ValueError: a limit is below 1.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = _PILLOW_MAX_PIXELS
    max_frames: int = 1000
    sampled_frames: int = 8
    max_total_pixels: int = 2 * _PILLOW_MAX_PIXELS

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{field.name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        """Limits from :class:`moderation.config.Settings` (``max_image_bytes``, ...).

        ``max_total_pixels`` is twice ``max_image_pixels`` (Settings has no field for it).
        """
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_frames=settings.max_frames,
            sampled_frames=settings.sampled_frames,
            max_total_pixels=2 * settings.max_image_pixels,
        )


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload, ready for the encoders and PDQ.

    Attributes:
        frames: 1 to ``sampled_frames`` images, mode "RGB", upright (EXIF orientation applied),
            alpha composited onto :data:`moderation.media.pixels.ALPHA_BACKGROUND`; independent of
            the input buffer.
        frame_indices: index of each frame in the file, ascending, starting with 0.
        format: Pillow's format name: one of :data:`moderation.media.formats.ALLOWED_FORMATS`,
            or "MPO" for a multi-picture JPEG from a camera.
        size: (width, height) px of the first frame as stored, before any draft reduction
            (TIFF: Pillow reports it already rotated by the TIFF Orientation tag).
        n_frames: frames in the file (1 for a still image).
    """

    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]
    format: str
    size: tuple[int, int]
    n_frames: int


def decode_image(
    data: bytes,
    limits: DecodeLimits = DecodeLimits(),  # frozen, so one shared default is safe
    *,
    draft_size: tuple[int, int] | None = None,
    draft_by_orientation: bool = False,
) -> DecodedImage:
    """Decode untrusted image bytes into upright RGB frames.

    Args:
        data: the whole file.
        limits: resource limits (:class:`DecodeLimits`).
        draft_size: (width, height) px the caller will resize to. For JPEG the decoder then
            scales down by 1/2, 1/4 or 1/8 while keeping both sides at least this large in the
            upright image (libjpeg DCT scaling via ``Image.draft``); other formats ignore it.
        draft_by_orientation: ``draft_size`` is (long side, short side) instead, matched to
            the upright image's orientation: e.g. (512, 224) serves both PDQ (long side
            downsampled to 512 px) and a 224 x 224 encoder input, portrait or landscape.

    Returns:
        :class:`DecodedImage`; a still image has one frame, an animation up to
        ``limits.sampled_frames`` frames, the first always included, the rest chosen to be as
        different as possible from each other (greedy farthest-point selection, Gonzalez 1985,
        on 16 x 16 thumbnails: the frame furthest in mean absolute difference from every frame
        chosen so far is added next), so a single odd frame is returned even when even
        sampling would skip it. Frames identical at thumbnail scale to a chosen one are not
        added.

    Raises:
        UnscannableImage: for any input that cannot be decoded within ``limits``; ``reason`` is
            one of :data:`UNSCANNABLE_REASONS`. No other exception escapes for bad input.
        ValueError: ``draft_size`` is not two positive ints (a caller bug, not an input one).

    Threads: ``warnings.catch_warnings`` swaps the process-wide filter list (Python < 3.14), so
    concurrent decodes in threads can lose the "error" filter for each other. The declared-size
    check against ``limits.max_pixels`` (by default Pillow's own limit) still refuses such
    images; run decodes in worker processes (Celery prefork) to keep both layers.
    """
    _check_draft_size(draft_size)
    fmt = _checked_format(data, limits)
    with warnings.catch_warnings(record=True) as caught:
        # Record (not print) Pillow's other warnings; "error" is inserted in front so it wins.
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, limits, draft_size, by_orientation=draft_by_orientation)
        except UnscannableImage as exc:
            logger.debug("unscannable %s image: %s", fmt, exc)
            raise
        except DECODER_ERRORS as exc:
            unscannable = UnscannableImage(*classify_failure(exc, data, fmt))
            logger.debug("unscannable %s image: %s (%s)", fmt, unscannable, type(exc).__name__)
            raise unscannable from exc
        finally:
            for warning in caught:
                logger.debug("Pillow warning while decoding: %s", warning.message)


def _checked_format(data: bytes, limits: DecodeLimits) -> str:
    """The allowed format of ``data``, after the checks that need no parsing (size, magic)."""
    if not data:
        raise UnscannableImage("empty", "0 bytes")
    if len(data) > limits.max_bytes:
        raise UnscannableImage(
            "too_large", f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes"
        )
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise UnscannableImage(
            "unsupported_format",
            f"magic bytes {data[:8].hex()} are not one of {', '.join(ALLOWED_FORMATS)}",
        )
    return fmt


def decode_file(
    path: str | os.PathLike[str],
    limits: DecodeLimits = DecodeLimits(),  # frozen, so one shared default is safe
    *,
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode an image file: :func:`decode_image` on its bytes.

    The size is checked with ``fstat`` before reading, and at most ``limits.max_bytes + 1``
    bytes are ever read (a file that grows meanwhile, or a /proc file reporting size 0, is
    still bounded). The file is opened non-blocking, so a FIFO cannot hang the caller.

    Raises:
        UnscannableImage: as :func:`decode_image`, plus ``unreadable`` (missing, not a regular
            file, permission denied, I/O error) and ``too_large`` from the size on disk.
        ValueError: ``draft_size`` is not two positive ints.
    """
    _check_draft_size(draft_size)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnscannableImage("unreadable", f"{path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnscannableImage("unreadable", f"{path}: not a regular file")
        if info.st_size > limits.max_bytes:
            raise UnscannableImage(
                "too_large", f"{info.st_size} bytes is over the limit of {limits.max_bytes} bytes"
            )
        with open(fd, "rb", closefd=False) as file:
            data = file.read(limits.max_bytes + 1)
    except OSError as exc:
        raise UnscannableImage("unreadable", f"{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return decode_image(data, limits, draft_size=draft_size)


def _check_draft_size(draft_size: tuple[int, int] | None) -> None:
    if draft_size is None:
        return
    if len(draft_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in draft_size):
        raise ValueError(f"draft_size must be two ints >= 1, got {draft_size!r}")


def _decode(
    data: bytes,
    limits: DecodeLimits,
    draft_size: tuple[int, int] | None,
    *,
    by_orientation: bool = False,
) -> DecodedImage:
    """Open, check limits, decode; Pillow's exceptions propagate to decode_image."""
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    try:
        fmt = image.format or "?"
        size = image.size
        _check_frame_pixels(size, limits, 0)
        declared = count_frames(image, data, limits.max_frames)
        if declared > limits.max_frames:
            shown = f"more than {limits.max_frames}" if fmt in ("GIF", "TIFF") else str(declared)
            raise UnscannableImage(
                "too_many_frames", f"{shown} frames; the limit is {limits.max_frames}"
            )
        if draft_size is not None and fmt in ("JPEG", "MPO"):
            sideways = _orientation(image) in (5, 6, 7, 8)
            if by_orientation:  # (long, short): orient it like the upright image
                long_side, short_side = max(draft_size), min(draft_size)
                upright_w, upright_h = (size[1], size[0]) if sideways else size
                portrait = upright_h > upright_w
                draft_size = (short_side, long_side) if portrait else (long_side, short_side)
            if sideways:  # stored sideways: the upright width is H
                draft_size = (draft_size[1], draft_size[0])
            image.draft("RGB", draft_size)
        if declared == 1 and fmt != "GIF":
            frame = _load_rgb(image, len(data))
            return DecodedImage(
                frames=(upright(frame, _orientation(image)),),
                frame_indices=(0,),
                format=fmt,
                size=size,
                n_frames=1,
            )
        frames, indices, n_frames = _decode_animation(image, declared, limits, len(data))
        return DecodedImage(
            frames=tuple(frames),
            frame_indices=tuple(indices),
            format=fmt,
            size=size,
            n_frames=n_frames,
        )
    finally:
        image.close()


def _decode_animation(
    image: ImageFile.ImageFile, declared: int, limits: DecodeLimits, data_size: int
) -> tuple[list[Image.Image], list[int], int]:
    """Decode every frame once (thumbnails), choose frames, return them upright.

    GIF frames are iterated until Pillow reports no more (our count was only a bound); other
    formats for exactly the count Pillow declares, so a missing frame is an EOFError. When
    every frame will be returned (declared <= sampled_frames) all are kept whatever their size,
    since the result holds them anyway; otherwise frames are kept up to ``_RETAIN_PIXELS`` and
    the chosen ones decoded again past that.
    """
    is_gif = image.format == "GIF"
    returns_all = declared <= limits.sampled_frames
    needs_thumbnails = is_gif or not returns_all  # a GIF may hold more frames than counted
    thumbnails: list[npt.NDArray[np.float32]] = []
    kept: list[Image.Image] | None = []
    kept_pixels = 0
    total_pixels = 0
    orientation = 1
    index = 0
    while True:
        if index and not _seek_frame(image, index, declared, limits):
            break
        pixels = _check_frame_pixels(image.size, limits, index)
        total_pixels += pixels
        if total_pixels > limits.max_total_pixels:
            raise UnscannableImage(
                "too_large",
                f"frames 0-{index} add up to {total_pixels} px, over the limit of "
                f"{limits.max_total_pixels} px",
            )
        frame = _load_rgb(image, data_size)
        if index == 0:
            orientation = _orientation(image)
        if needs_thumbnails:
            thumbnails.append(frame_thumbnail(frame))
        if kept is not None:
            kept_pixels += pixels
            if returns_all or kept_pixels <= _RETAIN_PIXELS:
                kept.append(frame)
            else:
                kept = None
        index += 1
    n_frames = index
    if n_frames <= limits.sampled_frames:
        indices = list(range(n_frames))
    else:
        indices = select_frames(np.stack(thumbnails), limits.sampled_frames)
    if kept is not None:
        frames = [kept[i] for i in indices]
    else:
        frames = []
        for i in indices:
            image.seek(i)
            frames.append(_load_rgb(image, data_size))
    return [upright(frame, orientation) for frame in frames], indices, n_frames


def _seek_frame(
    image: ImageFile.ImageFile, index: int, declared: int, limits: DecodeLimits
) -> bool:
    """Seek to frame ``index`` (>= 1); False when there is none (see _decode_animation)."""
    is_gif = image.format == "GIF"
    if not is_gif and index >= declared:
        return False
    try:
        image.seek(index)
    except EOFError:
        if is_gif:
            return False
        raise
    if index >= limits.max_frames:
        raise UnscannableImage("too_many_frames", f"more than {limits.max_frames} frames")
    return True


def _load_rgb(image: ImageFile.ImageFile, data_size: int) -> Image.Image:
    """The current frame decoded to RGB, detached from the file object."""
    if image.format == "TIFF":
        _check_tiff_strips(image, data_size)
    image.load()
    rgb = to_rgb(image)
    # The opened image is closed (and its GIF/WebP buffer reused by the next frame): detach it.
    return image.copy() if rgb is image else rgb


def _check_frame_pixels(size: tuple[int, int], limits: DecodeLimits, index: int) -> int:
    width, height = size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise UnscannableImage(
            "too_large",
            f"frame {index} is {width} x {height} = {pixels} px, over the limit of "
            f"{limits.max_pixels} px",
        )
    return pixels


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 2-8, or 1 when absent, invalid or unreadable (logged at debug)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except DECODER_ERRORS as exc:
        logger.debug(
            "unreadable EXIF ignored, no rotation applied: %s: %s", type(exc).__name__, exc
        )
        return 1
    if isinstance(value, int) and value in ORIENTATION_TRANSPOSE:
        return value
    if value != 1:
        logger.debug("invalid EXIF orientation %r ignored, no rotation applied", value)
    return 1


def _check_tiff_strips(image: ImageFile.ImageFile, data_size: int) -> None:
    """Refuse a TIFF frame whose strips or tiles end past the data, as ``truncated``.

    Compressed strips go to libtiff, which reports a short strip only as "decoder error -2";
    checking the extents first names the cause without relying on each codec's error path.
    """
    for end in tiff_data_ends(image):
        if end > data_size:
            raise UnscannableImage(
                "truncated", f"TIFF data ends at byte {end} but the file has {data_size} bytes"
            )
