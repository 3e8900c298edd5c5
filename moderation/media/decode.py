"""Safe image decoding: untrusted bytes -> RGB frames, or :class:`UnscannableImage`.

This is the first stage of the pipeline (decode -> embed -> search -> classify -> decide). Every
upload passes through :func:`decode_image` (or :func:`decode_file`), so it follows Pillow's own
security guidance (https://pillow.readthedocs.io/en/stable/handbook/security.html and
``reference/open_files.html``) and the RELIABILITY.md rows I1-I10:

- Only the formats in :data:`ALLOWED_FORMATS` are parsed: the magic bytes are checked first
  (:func:`sniff_format`) and the same list is passed to ``Image.open(formats=...)``. Nothing here
  spawns a process (Pillow's EPS plugin would run Ghostscript).
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
    The magic bytes are not one of :data:`ALLOWED_FORMATS` (EPS, PSD, FITS, PDF, SVG, HTML,
    random bytes, ...), or an allowed container holds a pixel layout Pillow cannot decode (for
    example planar float64 TIFF).
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
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format names that may be parsed; passed to ``Image.open(formats=...)``."""

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

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""sRGB colour that transparent pixels are composited onto: white.

Why white: browsers, chat clients and image viewers most often show a transparent image on a
white page, so the composite is what most viewers see, and it is what the admin review page
shows. No single background is safe against every trick: content drawn only in the alpha
channel over black RGB shows on white but vanishes on black, and content in the RGB of fully
transparent pixels is invisible yet recoverable by stripping alpha (see the report's open
problems). One fixed colour keeps the embedding of an image the same every time (I8).
"""

# Pillow's default MAX_IMAGE_PIXELS (PIL/Image.py: 1024 * 1024 * 1024 // 4 // 3, about 89.5 Mpx,
# a 0.25 GiB RGB bitmap), used only if a caller has disabled Pillow's global limit.
_PILLOW_DEFAULT_MAX_PIXELS: Final = 1024 * 1024 * 1024 // 4 // 3
_PILLOW_MAX_PIXELS: Final[int] = Image.MAX_IMAGE_PIXELS or _PILLOW_DEFAULT_MAX_PIXELS

# Frames of an animation decoded in the first pass are kept (as RGB) while their pixels add up to
# at most this; past it they are dropped and the chosen frames decoded again (second pass).
# 32 Mpx is 96 MiB of RGB: a typical GIF (100 frames of 480 x 270 = 13 Mpx) stays in one pass.
_RETAIN_PIXELS: Final = 32 * 1024 * 1024

# Side of the thumbnails that frames are compared with (16 x 16 RGB, 768 values): enough to tell
# one photo from another, cheap for 1000 frames.
_THUMBNAIL_SIDE: Final = 16

# EXIF Orientation (tag 0x0112) -> the transposition that makes the image upright; the same
# table as ImageOps.exif_transpose (PIL/ImageOps.py), per EXIF 2.32 (CIPA DC-008) section 4.6.4.
_ORIENTATION_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# What a broken file can make Pillow raise: the OSS-Fuzz harness list (see the module docstring;
# OverflowError is an ArithmeticError, UnidentifiedImageError an OSError) plus what broken plugins
# raise (struct.error, IndexError and KeyError as LookupError, EOFError, TypeError).
# RecursionError: deeply nested TIFF IFDs or EXIF sub-IFDs.
_DECODER_ERRORS: Final = (
    OSError,
    SyntaxError,
    MemoryError,
    ValueError,
    NotImplementedError,
    ArithmeticError,
    LookupError,
    EOFError,
    TypeError,
    struct.error,
    RecursionError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

# Substrings of Pillow's messages (lower-cased) used to classify a failure.
_BOMB_MARKERS: Final = ("decompressed data too large", "too much memory used in text chunks")
_UNSUPPORTED_MARKERS: Final = ("unknown pixel mode", "not supported", "unsupported")

# Plugin classes, to re-run a failed header parse and learn why (Image.open only says "cannot
# identify"). JPEG also covers MPO, whose factory starts from the JPEG parser.
_PLUGINS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}


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
            alpha composited onto :data:`ALPHA_BACKGROUND`; independent of the input buffer.
        frame_indices: index of each frame in the file, ascending, starting with 0.
        format: Pillow's format name: one of :data:`ALLOWED_FORMATS`, or "MPO" for a
            multi-picture JPEG from a camera.
        size: (width, height) px of the first frame as stored, before any draft reduction
            (TIFF: Pillow reports it already rotated by the TIFF Orientation tag).
        n_frames: frames in the file (1 for a still image).
    """

    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]
    format: str
    size: tuple[int, int]
    n_frames: int


def sniff_format(head: bytes) -> str | None:
    """The allowed format whose magic bytes start ``head``, else None.

    For the HTTP hook's 415 check, and the first gate of :func:`decode_image`. Pass at least the
    first 16 bytes (WebP needs 16). The signatures mirror the ``_accept`` functions of Pillow's
    plugins (PIL/JpegImagePlugin.py, PngImagePlugin.py, WebPImagePlugin.py, GifImagePlugin.py,
    BmpImagePlugin.py, TiffImagePlugin.py ``PREFIXES``), so anything this accepts Pillow will try
    and anything it rejects Pillow would not parse as an allowed format.

    Returns:
        "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF" or None.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP" and head[12:16] in _WEBP_CHUNKS:
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith(_TIFF_PREFIXES):
        return "TIFF"
    return None


_WEBP_CHUNKS: Final = (b"VP8 ", b"VP8X", b"VP8L")
_TIFF_PREFIXES: Final = tuple(TiffImagePlugin.PREFIXES)


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
    with warnings.catch_warnings(record=True) as caught:
        # Record (not print) Pillow's other warnings; "error" is inserted in front so it wins.
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, limits, draft_size, by_orientation=draft_by_orientation)
        except UnscannableImage as exc:
            logger.debug("unscannable %s image: %s", fmt, exc)
            raise
        except _DECODER_ERRORS as exc:
            unscannable = _classify(exc, data, fmt)
            logger.debug("unscannable %s image: %s (%s)", fmt, unscannable, type(exc).__name__)
            raise unscannable from exc
        finally:
            for warning in caught:
                logger.debug("Pillow warning while decoding: %s", warning.message)


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to "RGB" by one fixed rule (I8).

    1. "RGB" without transparency is returned as is (no copy).
    2. Deep grey modes become "L" by the value range the mode implies: "I;16*" maps
       0..65535 to 0..255. "I" (32-bit int) and "F" (32-bit float) do not fix a range, so the
       data choose the smallest nominal range holding it: 0..1 ("F" only), 0..255 or 0..65535
       when all values are >= 0, else min..max (a constant image becomes black). NaN maps to
       the minimum, infinities to the ends. So 16-bit data in "I" does not clip to white and
       8-bit data in "I" or "F" keeps its brightness. A "transparency" grey value becomes alpha.
    3. Anything with transparency (an alpha band: LA, La, PA, RGBA, RGBa; a palette with alpha;
       a "transparency" entry in ``info``) is composited onto :data:`ALPHA_BACKGROUND`.
    4. Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) uses Pillow's ``convert("RGB")``.
       ICC profiles are ignored (pixels are taken as sRGB); CMYK uses Pillow's naive formula.

    Args:
        image: any Pillow image; loaded by this call if it is lazy.

    Returns:
        An image of mode "RGB" and the same size (``image`` itself in case 1).

    Raises:
        ValueError: Pillow cannot convert the mode (no mode listed in ``Image.MODES`` of
            Pillow 13 does this).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _scaled_grey(image)
    elif image.mode == "La":
        image = image.convert("LA")
    elif image.mode == "RGBa":
        image = image.convert("RGBA")
    if image.has_transparency_data:
        return _composite(image)
    return image.convert("RGB")


def _composite(image: Image.Image) -> Image.Image:
    """``image`` (with transparency) composited onto :data:`ALPHA_BACKGROUND`, as RGB."""
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
    background.paste(rgba, mask=alpha)
    return background


def _scaled_grey(image: Image.Image) -> Image.Image:
    """An "I", "I;16*" or "F" image as "L" (or "LA" with its transparency), by to_rgb's rule 2."""
    values = np.asarray(image)  # uint16, int32 or float32, (height, width)
    if image.mode.startswith("I;16"):
        low, high, finite = 0.0, 65535.0, True
    else:
        low, high, finite = _nominal_range(values)
    scaled = values.astype(np.float32)  # a writable copy, scaled in place below
    if not finite:
        np.nan_to_num(scaled, copy=False, nan=low, posinf=high, neginf=low)
    scaled -= low
    scaled *= 255.0 / (high - low)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    grey = Image.fromarray(scaled.astype(np.uint8))
    transparency = image.info.get("transparency")
    if isinstance(transparency, int) and not isinstance(transparency, bool):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(alpha)))
    return grey


def _nominal_range(values: npt.NDArray[Any]) -> tuple[float, float, bool]:
    """(low, high, all finite) for an "I" or "F" array, by to_rgb's rule 2."""
    is_float = values.dtype.kind == "f"
    vmin, vmax = float(values.min()), float(values.max())  # NaN propagates
    finite = math.isfinite(vmin) and math.isfinite(vmax)
    if not finite:
        mask = np.isfinite(values)
        if not mask.any():
            return 0.0, 1.0, False
        vmin = float(values.min(where=mask, initial=np.inf))
        vmax = float(values.max(where=mask, initial=-np.inf))
    if vmin >= 0.0:
        if is_float and vmax <= 1.0:
            return 0.0, 1.0, finite
        if vmax <= 255.0:
            return 0.0, 255.0, finite
        if vmax <= 65535.0:
            return 0.0, 65535.0, finite
    if vmax == vmin:
        return vmin, vmin + 1.0, finite
    return vmin, vmax, finite


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
        declared = _count_frames(image, data, limits.max_frames)
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
                frames=(_upright(frame, _orientation(image)),),
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
        if index:
            if not is_gif and index >= declared:
                break
            try:
                image.seek(index)
            except EOFError:
                if is_gif:
                    break
                raise
            if index >= limits.max_frames:
                raise UnscannableImage("too_many_frames", f"more than {limits.max_frames} frames")
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
            thumbnails.append(_thumbnail(frame))
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
        indices = _select_frames(np.stack(thumbnails), limits.sampled_frames)
    if kept is not None:
        frames = [kept[i] for i in indices]
    else:
        frames = []
        for i in indices:
            image.seek(i)
            frames.append(_load_rgb(image, data_size))
    return [_upright(frame, orientation) for frame in frames], indices, n_frames


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


def _count_frames(image: ImageFile.ImageFile, data: bytes, limit: int) -> int:
    """Frames in the file, counted only up to ``limit + 1`` and without decoding pixels.

    Pillow's ``n_frames`` walks every frame for GIF (about 3 µs a frame in Python: seconds for
    the ~1.4 M minimal frames that fit in 32 MiB) and every IFD for TIFF, so both are counted
    here with a stop; the other formats declare their count in a header (APNG acTL, WebP
    demuxer, MPO index).
    """
    if image.format == "GIF":
        return _count_gif_frames(data, limit + 1)
    if image.format == "TIFF":
        count = 1
        while count <= limit:
            try:
                image.seek(count)  # parses the next IFD only; pixels load lazily
            except EOFError:
                break
            count += 1
        if count > 1:
            image.seek(0)
        return count
    return int(getattr(image, "n_frames", 1))


def _count_gif_frames(data: bytes, stop_at: int) -> int:
    """Image descriptors in a GIF, counted up to ``stop_at``.

    Walks the block structure of GIF89a (https://www.w3.org/Graphics/GIF/spec-gif89a.txt,
    sections 18-27) the way ``GifImagePlugin.GifImageFile._seek`` does, including its habit of
    skipping unknown bytes between blocks, but without decoding any LZW data.
    """
    size = len(data)
    if size < 13:
        return 0
    pos = 13  # header (6) + logical screen descriptor (7)
    if data[10] & 0x80:  # global colour table
        pos += 3 << ((data[10] & 7) + 1)
    frames = 0
    while pos < size and frames < stop_at:
        introducer = data[pos]
        pos += 1
        if introducer == 0x3B:  # trailer
            break
        if introducer == 0x21:  # extension: label byte, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 1)
        elif introducer == 0x2C:  # image descriptor
            if pos + 9 > size:
                break
            flags = data[pos + 8]
            pos += 9
            if flags & 0x80:  # local colour table
                pos += 3 << ((flags & 7) + 1)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW minimum code size
            frames += 1
    return frames


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a chain of GIF data sub-blocks (length byte, data; 0 ends the chain)."""
    size = len(data)
    while pos < size:
        length = data[pos]
        pos += 1 + length
        if length == 0:
            break
    return pos


def _thumbnail(frame: Image.Image) -> npt.NDArray[np.float32]:
    """A (768,) float32 vector: the frame as 16 x 16 RGB, box-filtered, values 0..255."""
    small = frame.resize((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1)


def _select_frames(thumbnails: npt.NDArray[np.float32], count: int) -> list[int]:
    """Indices of ``count`` frames: 0, then greedily the frame furthest from those chosen.

    Greedy farthest-point selection (T. F. Gonzalez, "Clustering to minimize the maximum
    intercluster distance", Theoretical Computer Science 38, 1985) with mean absolute
    difference between (n, 768) thumbnails. Stops early when every remaining frame has a
    thumbnail identical to a chosen one. Ties go to the earliest frame.
    """
    chosen = [0]
    distance = np.abs(thumbnails - thumbnails[0]).mean(axis=1)
    while len(chosen) < count:
        best = int(np.argmax(distance))
        if distance[best] <= 0.0:
            break
        chosen.append(best)
        distance = np.minimum(distance, np.abs(thumbnails - thumbnails[best]).mean(axis=1))
    return sorted(chosen)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 2-8, or 1 when absent, invalid or unreadable (logged at debug)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODER_ERRORS as exc:
        logger.debug(
            "unreadable EXIF ignored, no rotation applied: %s: %s", type(exc).__name__, exc
        )
        return 1
    if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE:
        return value
    if value != 1:
        logger.debug("invalid EXIF orientation %r ignored, no rotation applied", value)
    return 1


def _upright(frame: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return frame if method is None else frame.transpose(method)


def _classify(exc: BaseException, data: bytes, fmt: str) -> UnscannableImage:
    """Map a Pillow failure on an allowed format to a reason (see the module docstring)."""
    if isinstance(exc, UnidentifiedImageError):
        # Image.open hides why the plugin refused the header: ask the plugin itself.
        exc = _diagnose(data, fmt) or exc
    message = str(exc) or type(exc).__name__
    lowered = message.lower()
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return UnscannableImage("too_large", message)
    if isinstance(exc, MemoryError):
        return UnscannableImage("too_large", f"out of memory while decoding: {message}")
    if any(marker in lowered for marker in _BOMB_MARKERS):
        return UnscannableImage("bomb", message)
    if isinstance(exc, EOFError) or "truncated" in lowered or _declares_more_data(data, fmt):
        return UnscannableImage("truncated", message)
    if isinstance(exc, NotImplementedError) or any(m in lowered for m in _UNSUPPORTED_MARKERS):
        return UnscannableImage("unsupported_format", f"{fmt}: {message}")
    return UnscannableImage("corrupt", f"{fmt}: {message}")


def _diagnose(data: bytes, fmt: str) -> BaseException | None:
    """The exception ``fmt``'s plugin raises on ``data``'s header, or None if it opens."""
    plugin = _PLUGINS.get(fmt)
    if plugin is None:
        return None
    try:
        plugin(io.BytesIO(data)).close()
    except _DECODER_ERRORS as exc:
        # ImageFile wraps IndexError, KeyError, EOFError, struct.error as SyntaxError(original).
        return exc.__cause__ if isinstance(exc.__cause__, EOFError) else exc
    return None


def _declares_more_data(data: bytes, fmt: str) -> bool:
    """Whether the header points past the end of ``data`` (so a failure means truncation)."""
    try:
        if fmt == "WEBP":  # RIFF chunk size excludes the 8-byte RIFF header
            return bool(struct.unpack_from("<I", data, 4)[0] + 8 > len(data))
        if fmt == "BMP":  # BITMAPFILEHEADER bfSize
            return bool(struct.unpack_from("<I", data, 2)[0] > len(data))
        if fmt == "GIF":  # every GIF ends with the trailer 0x3B (GIF89a section 27)
            return not data.endswith(b";")
        if fmt == "TIFF":
            return _tiff_ifds_end_past(data)
    except struct.error:
        return True
    return False


def _tiff_ifds_end_past(data: bytes) -> bool:
    """Whether an IFD in the chain (TIFF 6.0 section 2; BigTIFF) lies past the end of ``data``.

    Raises:
        struct.error: the header itself is cut short.
    """
    order = "<" if data.startswith(b"II") else ">"
    big = data[2:4] in (b"\x2b\x00", b"\x00\x2b")
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    offset_size = struct.calcsize(offset_format)
    offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < 4096:
        seen.add(offset)
        if offset + struct.calcsize(count_format) > len(data):
            return True
        count = struct.unpack_from(order + count_format, data, offset)[0]
        next_at = offset + struct.calcsize(count_format) + count * entry_size
        if next_at + offset_size > len(data):
            return True
        offset = struct.unpack_from(order + offset_format, data, next_at)[0]
    return False


def _check_tiff_strips(image: ImageFile.ImageFile, data_size: int) -> None:
    """Refuse a TIFF frame whose strips or tiles end past the data, as ``truncated``.

    Compressed strips go to libtiff, which reports a short strip only as "decoder error -2";
    checking the extents first names the cause without relying on each codec's error path.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles (TIFF 6.0)
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if not isinstance(offsets, tuple) or not isinstance(counts, tuple):
            continue
        ends = [
            o + c
            for o, c in zip(offsets, counts, strict=False)
            if isinstance(o, int) and isinstance(c, int)
        ]
        if ends and max(ends) > data_size:
            raise UnscannableImage(
                "truncated",
                f"TIFF data ends at byte {max(ends)} but the file has {data_size} bytes",
            )
