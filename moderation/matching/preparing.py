"""The first half of screening: exact hashes' inputs, decode, PDQ and the encoder's preprocessing.

:class:`Preparer` needs neither the loaded model nor the decrypted blocklist, only the encoder's
preprocessing and the decode limits, so a pipeline can prepare uploads while the model and the
snapshot are still loading (:func:`moderation.service.operations.screen_paths`) and then while
:class:`moderation.matching.screening.Screener` embeds the previous batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from moderation.matching.candidates import EVERY_BANK, Candidate, Scope
from moderation.matching.video import VideoUpload, decode_video_upload, is_video
from moderation.media.decode import DecodedImage, DecodeLimits, UnscannableImage, decode_image
from moderation.media.video import DEFAULT_VIDEO_LIMITS, VideoLimits
from moderation.signals.encoders import Encoder
from moderation.signals.pdq import PdqHash, pdq_hash_dihedral

#: JPEG draft target (px) as (long side, short side): large JPEGs decode at reduced scale, never
#: below it; (512, 224) serves PDQ (long side 512) and the 224 x 224 encoder input from one decode.
DRAFT_SIZE: Final = (512, 224)


@dataclass
class Work:
    """One upload on its way through the pipeline (index: its place in the batch)."""

    index: int
    data: bytes = b""
    decoded: DecodedImage | None = None
    video: VideoUpload | None = None
    error: UnscannableImage | None = None
    timings: dict[str, float] = field(default_factory=dict)
    vectors: npt.NDArray[np.float32] | None = None
    # (f, w, d) feature-map windows of the frames, when the classifier stage asked for them.
    windows: npt.NDArray[np.float32] | None = None
    # RANSAC inliers per verified entry, when the classifier stage asked for local features.
    local: dict[int, int] | None = None
    pdq: tuple[tuple[PdqHash, ...], ...] = ()
    exact: list[Candidate] = field(default_factory=list)
    scope: Scope = EVERY_BANK
    inputs: list[Any] = field(default_factory=list)
    nearest: float | None = None  # cosine of the nearest bank entry (drift monitoring)


@dataclass(frozen=True)
class Prepared:
    """A batch after :meth:`Preparer.prepare`, ready for ``Screener.finish``; ``preprocessing``
    names the encoder preprocessing its inputs went through."""

    works: list[Work]
    preprocessing: str


def elapsed_ms(start: float) -> float:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class Preparer:
    """Decodes, hashes and preprocesses uploads for ``encoder`` (which need not be loaded).

    Args:
        encoder: its :meth:`~moderation.signals.encoders.Encoder.preprocess` makes the inputs.
        limits: decode limits.
        draft_size: JPEG draft target (see :data:`DRAFT_SIZE`), or None for full decodes.
        video_limits: limits and sampling for MP4, MOV and WebM uploads, whose sampled frames
            are screened like an animation's (:mod:`moderation.matching.video`).
    """

    encoder: Encoder
    limits: DecodeLimits
    draft_size: tuple[int, int] | None = DRAFT_SIZE
    video_limits: VideoLimits = DEFAULT_VIDEO_LIMITS

    def prepare(self, items: Sequence[bytes], scopes: Sequence[Scope] | None = None) -> Prepared:
        """Decode, PDQ and preprocess each item (``scopes``: one per item, default every bank).
        Thread-safe and GIL-light (Pillow, PDQ and numpy release the GIL). Never raises for bad
        images: their work carries the :class:`UnscannableImage`."""
        scopes = list(scopes) if scopes is not None else [EVERY_BANK] * len(items)
        works = [
            Work(i, data=data, scope=scope)
            for i, (data, scope) in enumerate(zip(items, scopes, strict=True))
        ]
        for work in works:
            self._decode(work)
            if work.decoded is not None:
                self._hash(work)
        return Prepared(works, self.encoder.preprocessing)

    def _decode(self, work: Work) -> None:
        start = time.perf_counter()
        try:
            if is_video(work.data):
                work.video = decode_video_upload(work.data, self.video_limits)
                work.decoded = work.video.as_image()
            else:
                work.decoded = decode_image(
                    work.data, self.limits, draft_size=self.draft_size, draft_by_orientation=True
                )
        except UnscannableImage as exc:
            work.error = exc
        work.timings["decode"] = elapsed_ms(start)

    def _hash(self, work: Work) -> None:
        assert work.decoded is not None
        start = time.perf_counter()
        work.pdq = tuple(pdq_hash_dihedral(frame) for frame in work.decoded.frames)
        work.timings["pdq"] = elapsed_ms(start)
        start = time.perf_counter()
        work.inputs = self.encoder.preprocess(work.decoded.frames)
        work.timings["embed"] = elapsed_ms(start)
