"""Animation frames without decoding them all twice: counting them, choosing which to screen.

:func:`count_frames` bounds the work before any pixel is decoded (GIF and TIFF are counted here
with a stop, since Pillow walks every frame); :func:`select_frames` picks, from 16 x 16
thumbnails (:func:`frame_thumbnail`), the frames most different from each other, so one odd
frame hidden in a benign animation is screened (RELIABILITY.md I6). Used by
:mod:`moderation.media.decode`.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile

# Side of the thumbnails that frames are compared with (16 x 16 RGB, 768 values): enough to tell
# one photo from another, cheap for 1000 frames.
_THUMBNAIL_SIDE: Final = 16


def count_frames(image: ImageFile.ImageFile, data: bytes, limit: int) -> int:
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


def frame_thumbnail(frame: Image.Image) -> npt.NDArray[np.float32]:
    """A (768,) float32 vector: ``frame`` (mode "RGB") as 16 x 16 RGB, box-filtered, 0..255."""
    small = frame.resize((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1)


def select_frames(thumbnails: npt.NDArray[np.float32], count: int) -> list[int]:
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
