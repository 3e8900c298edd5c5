"""A decoded frame made canonical: "RGB" by one fixed rule (RELIABILITY.md I8), and upright.

Every decoded frame goes through :func:`to_rgb` and :func:`upright` (in
:mod:`moderation.media.decode`), so the same image always gives the same pixels to the encoders
and PDQ whatever mode it was stored in and whichever way the camera held it.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""sRGB colour that transparent pixels are composited onto: white.

Why white: browsers, chat clients and image viewers most often show a transparent image on a
white page, so the composite is what most viewers see, and it is what the admin review page
shows. No single background is safe against every trick: content drawn only in the alpha
channel over black RGB shows on white but vanishes on black, and content in the RGB of fully
transparent pixels is invisible yet recoverable by stripping alpha (see the report's open
problems). One fixed colour keeps the embedding of an image the same every time (I8).
"""


# EXIF Orientation (tag 0x0112) -> the transposition that makes the image upright; the same
# table as ImageOps.exif_transpose (PIL/ImageOps.py), per EXIF 2.32 (CIPA DC-008) section 4.6.4.
ORIENTATION_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


def upright(frame: Image.Image, orientation: int) -> Image.Image:
    """``frame`` transposed by EXIF orientation 2-8 (1 or unknown: ``frame`` itself)."""
    method = ORIENTATION_TRANSPOSE.get(orientation)
    return frame if method is None else frame.transpose(method)
