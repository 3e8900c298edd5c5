"""The first half of screening: exact hashes' inputs, decode, PDQ and the encoder's preprocessing.

:class:`Preparer` needs neither the loaded model nor the decrypted blocklist, only the encoder's
preprocessing and the decode limits, so a pipeline can prepare uploads while the model and the
snapshot are still loading (:func:`moderation.service.operations.screen_paths`) and then while
:class:`moderation.matching.screening.Screener` embeds the previous batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from moderation.matching.candidates import EVERY_BANK, Candidate, Scope
from moderation.matching.video import VideoUpload, decode_video_upload, is_video
from moderation.media.decode import DecodedImage, DecodeLimits, UnscannableImage, decode_image
from moderation.media.video import DEFAULT_VIDEO_LIMITS, VideoLimits
from moderation.signals.encoders import Encoder
from moderation.signals.pdq import PdqHash, pdq_hash_dihedral

if TYPE_CHECKING:
    from moderation.config import Settings
    from moderation.signals.local_features import Verified

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
    # The first frame being verified by local features in the background (when asked for).
    verifying: Future[Verified] | None = None
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


def embed_works(encoder: Encoder, works: Sequence[Work], *, windows: bool, batch_size: int) -> None:
    """Embed the decoded works that have no vectors yet (or no feature-map windows, when
    ``windows`` asks for them: :meth:`~moderation.signals.encoders.Encoder.
    encode_inputs_with_windows`), in one encoder batch, and add each one's share of the time
    to its ``timings["embed"]`` (ms). Without ``windows``, windows from an earlier pass are
    dropped, so a work is screened the same whether it was embedded early or not.

    Raises:
        whatever the encoder raises (a model that cannot load).
    """
    if not windows:
        for work in works:
            work.windows = None
    pending = [
        w
        for w in works
        if w.decoded is not None and (w.vectors is None or (windows and w.windows is None))
    ]
    inputs = [x for w in pending for x in w.inputs]
    if not inputs:
        return
    start = time.perf_counter()
    found = None
    if windows:
        vectors, found = encoder.encode_inputs_with_windows(inputs, batch_size=batch_size)
    else:
        vectors = encoder.encode_inputs(inputs, batch_size=batch_size)
    per_frame = elapsed_ms(start) / len(inputs)
    offset = 0
    for work in pending:
        count = len(work.inputs)
        work.vectors = vectors[offset : offset + count]
        if found is not None:
            work.windows = found[offset : offset + count]
        work.timings["embed"] = work.timings.get("embed", 0.0) + per_frame * count
        offset += count


@dataclass(frozen=True)
class Preparer:
    """Decodes, hashes and preprocesses uploads for ``encoder`` (which need not be loaded).

    Args:
        encoder: its :meth:`~moderation.signals.encoders.Encoder.preprocess` makes the inputs.
        limits: decode limits.
        draft_size: JPEG draft target (see :data:`DRAFT_SIZE`), or None for full decodes.
        video_limits: limits and sampling for MP4, MOV and WebM uploads, whose sampled frames
            are screened like an animation's (:mod:`moderation.matching.video`).
        feature_windows: whether :meth:`embed` also takes feature-map windows (when the
            classifier stage may ask for them; the screener drops them otherwise).
        batch_size: frames per encoder call in :meth:`embed` (the screener's, from the
            settings).
    """

    encoder: Encoder
    limits: DecodeLimits
    draft_size: tuple[int, int] | None = DRAFT_SIZE
    video_limits: VideoLimits = DEFAULT_VIDEO_LIMITS
    feature_windows: bool = False
    batch_size: int = 32

    @classmethod
    def from_settings(cls, encoder: Encoder, settings: Settings) -> Preparer:
        """A preparer for ``encoder`` under ``settings``: its decode and video limits, its
        encoder batch size, and feature-map windows when the classifier stage may use them
        (``classifier`` and ``classifier_feature_windows``)."""
        return cls(
            encoder,
            DecodeLimits.from_settings(settings),
            video_limits=VideoLimits.from_settings(settings),
            feature_windows=settings.classifier and settings.classifier_feature_windows,
            batch_size=settings.batch_size,
        )

    def embed(self, prepared: Prepared) -> Prepared:
        """``prepared`` with its works embedded now (:func:`embed_works`), before any
        screener exists: once the encoder has loaded, a pipeline embeds while the blocklist
        and the database still load. Returns ``prepared`` itself."""
        windows = self.feature_windows and self.encoder.has_feature_windows
        embed_works(self.encoder, prepared.works, windows=windows, batch_size=self.batch_size)
        return prepared

    def prepare(
        self,
        items: Sequence[bytes],
        scopes: Sequence[Scope] | None = None,
        hashed: Callable[[Work], None] | None = None,
    ) -> Prepared:
        """Decode, PDQ and preprocess each item (``scopes``: one per item, default every bank).
        ``hashed`` is called with each decoded item's work once its PDQ is known (the
        screener starts local features there: ``Work.verifying``).
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
                if hashed is not None:
                    hashed(work)
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
