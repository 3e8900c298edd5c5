"""Training data for the classifier stage without humans: edited copies made at bank import.

At bank import, while the originals are still in memory, each imported image gets
``classifier_edits_per_entry`` edited copies from the benchmark's edit families
(:mod:`moderation.media.edits`), drawn with *training* seeds (:func:`training_seed`, never the
evaluation's ``query_seed``) and, for the edits whose strength is fixed in the benchmark, with
the strength varied around it (:func:`training_copy`). Only the copies' signals (vectors, PDQ
digests, view vectors) are kept, never pixels; after the import commits, each copy is searched
against the new snapshot and its candidates become labelled pairs (features only): its source
entry a copy, the other candidates non-copies, plus the candidates it has when its source is
left out of the bank (the negatives of a query that is in no bank). The background set
(:func:`background_images`), edited the same way, gives further non-copies at training time
(:mod:`moderation.matching.classifier.training`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter, ImageOps

from moderation.audit.log import record_event
from moderation.banks.blocklist import Blocklist
from moderation.banks.importer import ImportHooks
from moderation.banks.keypoint_rows import keypoint_budget, local_index
from moderation.banks.paste_rows import paste_index
from moderation.matching.classifier.features import QuerySignals, RegionLookup, query_features
from moderation.matching.classifier.regions import query_views, query_windows
from moderation.matching.classifier.stage import Band, WindowBand, embed_views
from moderation.matching.policy import CandidateRules
from moderation.media.edits import RANDOM_EDITS, apply_edit, derived_seed
from moderation.media.implementations import (
    IMPLEMENTATIONS,
    TUNING,
    TUNING_EXTRA,
    apply_implementation,
)
from moderation.signals import local_features as lf
from moderation.signals.pdq import hamming_distance, pdq_hash, pdq_hash_dihedral
from moderation.storage.db import transaction
from moderation.storage.models import LabelledPair

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)

TRAINING_CANDIDATES = CandidateRules(top_k=8, min_cosine=0.3, min_window_cosine=0.5)
"""Candidate search for training queries: deeper than the default policy's, for hard
negatives."""
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "clock",
    "horse",
    "page",
    "text",
    "cell",
)
"""scikit-image sample photos bundled with the package (no download): the default background."""


def training_seed(key: str, edit: str, index: int) -> int:
    """Seed of the ``index``-th training copy of the image ``key`` (its SHA-256): derived like
    the benchmark's seeds but for the purpose ``"train"``, so never equal to a ``query_seed``."""
    material = int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")
    return derived_seed("train", material, edit, index)


def training_copy(
    edit: str, image: Image.Image, seed: int, background: Image.Image | None
) -> Image.Image:
    """An edited copy by the tuning implementation ``edit`` (:data:`~moderation.media.
    implementations.TUNING`; never an unseen one). Edits with random parameters use ``seed``;
    for the benchmark's fixed-strength edits the strength is drawn around the benchmark's so
    that training copies are other instances of the family, not the evaluation's images.

    Raises:
        ValueError: ``edit`` is not a tuning implementation, or it pastes onto a background
            and ``background`` is None.
    """
    if edit not in TUNING:
        raise ValueError(f"{edit!r} is not a tuning edit implementation; valid: {TUNING}")
    if edit in TUNING_EXTRA:
        return apply_implementation(edit, image, seed=seed, background=background)
    rng = random.Random(seed)  # noqa: S311 (reproducible augmentation, not security)
    rgb = image.convert("RGB")
    w, h = rgb.size
    if edit in RANDOM_EDITS:
        return apply_edit(edit, rgb, seed=seed, background=background)
    if edit == "resize_40":
        f = rng.uniform(0.3, 0.55)
        return rgb.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)
    if edit == "jpeg_q15":
        return apply_edit("jpeg_q15", rgb.resize((w - w // 10, h - h // 10)), seed=seed)
    if edit == "center_crop_70":
        f = rng.uniform(0.6, 0.8)
        dx, dy = round(w * (1 - f) / 2), round(h * (1 - f) / 2)
        return rgb.crop((dx, dy, w - dx, h - dy))
    if edit == "rotate_15":
        angle = rng.choice((-1, 1)) * rng.uniform(8, 20)
        turned = rgb.rotate(angle, Image.Resampling.BICUBIC)
        return ImageOps.crop(turned, border=round(min(w, h) * 0.18))
    if edit == "pixelize":
        # Blocks of 6-8.5% or 11.5-15% of the side: never the benchmark's 10% grid.
        f = rng.choice((rng.uniform(0.06, 0.085), rng.uniform(0.115, 0.15)))
        small = rgb.resize((max(2, round(w * f)), max(2, round(h * f))), Image.Resampling.BOX)
        return small.resize((w, h), Image.Resampling.NEAREST)
    if edit == "blur_r3":
        return rgb.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 4.0)))
    # hflip, greyscale: one possible instance each; vary the size so the pixels differ.
    out = apply_edit(edit, rgb, seed=seed)
    f = rng.uniform(0.6, 0.9)
    return out.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)


def edits_for(index: int, count: int) -> list[str]:
    """The ``count`` tuning edit implementations of the ``index``-th image: round robin over
    :data:`~moderation.media.implementations.TUNING` (the benchmark's 17 edits and the extra
    tuning implementations), so each gets about the same number of training copies; unseen
    implementations are never drawn."""
    names = TUNING
    return [names[(index * count + j) % len(names)] for j in range(count)]


def needs_background(edit: str) -> bool:
    """Whether the implementation ``edit`` pastes onto a background photo."""
    return IMPLEMENTATIONS[edit].needs_background


def background_images(directory: Path | None) -> list[Image.Image]:
    """The background set: the images in ``directory`` (sorted), else scikit-image's samples."""
    if directory is not None:
        images = []
        for path in sorted(directory.iterdir()):
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, ValueError):
                logger.warning("background image %s skipped: not an image", path)
        return images
    import skimage.data

    images = []
    for name in SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, :3]
        images.append(Image.fromarray(np.asarray(array, np.uint8)).convert("RGB"))
    return images


@dataclass
class TrainingQuery:
    """The signals of one training copy (no pixels). ``source`` is the SHA-256 of the image it
    was made from (None for a background copy); ``group`` ties its pairs for the split."""

    source: str | None
    group: int
    edit: str
    signals: QuerySignals


Rank = Callable[[list[Image.Image]], list[float]]


def digest_rank(digest: bytes) -> Rank:
    """Ranks crops by their PDQ distance to ``digest`` (a training copy's own source: the
    entry the stage's bank-wide ranking would find at query time)."""

    def rank(crops: list[Image.Image]) -> list[float]:
        return [float(hamming_distance(pdq_hash(c).digest, digest)) for c in crops]

    return rank


def query_signals(
    images: Sequence[Image.Image],
    encoder: Encoder,
    *,
    batch_size: int,
    max_views: int = 1,
    ranks: Sequence[Rank | None] | None = None,
    window_band: WindowBand | None = None,
    sources: npt.NDArray[np.float32] | None = None,
    feature_windows: bool = False,
    local_features: bool = False,
) -> list[QuerySignals]:
    """Global vectors, dihedral PDQ, view vectors and view PDQ of images seen as queries;
    ``ranks`` (one per image) choose among detected rectangles as the stage does. With
    ``window_band`` and ``sources`` (float32 (n, d), each image's source vector), an image whose
    cosine to its source lies in the band also gets its query windows as views (after the
    detected ones, not PDQ-hashed), as the stage gives them to such a query. With
    ``feature_windows`` (and an encoder that has them) each image also gets its feature-map
    windows from the same encoder pass, as the screener gives them to the stage. With
    ``local_features`` each also keeps its SIFT keypoints (verified later against the bank,
    :func:`pairs_of`)."""
    windows: npt.NDArray[np.float32] | None = None
    if feature_windows and encoder.has_feature_windows:
        inputs = encoder.preprocess(list(images))
        vectors, windows = encoder.encode_inputs_with_windows(inputs, batch_size=batch_size)
    else:
        vectors = encoder.encode(list(images), batch_size=batch_size)
    chosen = ranks if ranks is not None else [None] * len(images)
    detected = [
        [v for _, v in query_views(image, max_views=max_views, rank=rank)]
        for image, rank in zip(images, chosen, strict=True)
    ]
    views = [list(found) for found in detected]
    if window_band is not None and sources is not None:
        for i, image in enumerate(images):
            if window_band.contains(float(vectors[i] @ sources[i]), None):
                views[i].extend(query_windows(image))
    view_vectors = embed_views(encoder, views, batch_size=batch_size)
    return [
        QuerySignals(
            vectors[i : i + 1],
            (pdq_hash_dihedral(image),),
            view_vectors[i],
            tuple(pdq_hash(v) for v in detected[i]),
            None if windows is None else windows[i],
            keypoints=lf.extract_query(image) if local_features else None,
        )
        for i, image in enumerate(images)
    ]


@dataclass
class TrainingCollector:
    """Collects training copies at import (``__call__`` is the importer's hook).

    Args:
        encoder: the bank's encoder.
        edits_per_image: copies per imported image.
        backgrounds: photos the pastes (family ``overlay_bg_60``) go onto (never bank images).
        window_band: when set, copies in the band get query windows (:func:`query_signals`;
            one more embedding per imported image, for the source vectors).
        feature_windows: copies get their feature-map windows (:func:`query_signals`).
        local_features: copies keep their SIFT keypoints (:func:`query_signals`).
    """

    encoder: Encoder
    edits_per_image: int
    backgrounds: list[Image.Image]
    batch_size: int = 32
    window_band: WindowBand | None = None
    feature_windows: bool = False
    local_features: bool = False
    queries: list[TrainingQuery] = field(default_factory=list)
    _seen: int = 0

    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> None:
        """Make and embed the copies of ``images`` (their SHA-256 ``keys``)."""
        copies: list[tuple[str, str, Image.Image]] = []
        ranks: list[Rank | None] = []
        source_rows: list[int] = []
        for row, (image, key) in enumerate(zip(images, keys, strict=True)):
            source_rank = digest_rank(pdq_hash(image).digest)
            for j, edit in enumerate(edits_for(self._seen, self.edits_per_image)):
                seed = training_seed(key, edit, j)
                background = (
                    self.backgrounds[seed % len(self.backgrounds)] if self.backgrounds else None
                )
                if needs_background(edit) and background is None:
                    continue
                copies.append((key, edit, training_copy(edit, image, seed, background)))
                ranks.append(source_rank)
                source_rows.append(row)
            self._seen += 1
        if not copies:
            return
        sources = None
        if self.window_band is not None and self.window_band.enabled:
            sources = self.encoder.encode(list(images), batch_size=self.batch_size)[source_rows]
        signals = query_signals(
            [c for _, _, c in copies],
            self.encoder,
            batch_size=self.batch_size,
            ranks=ranks,
            window_band=self.window_band,
            sources=sources,
            feature_windows=self.feature_windows,
            local_features=self.local_features,
        )
        for (key, edit, _), sig in zip(copies, signals, strict=True):
            group = int.from_bytes(hashlib.sha256(f"{key}:{edit}".encode()).digest()[:6], "big")
            self.queries.append(TrainingQuery(key, group, edit, sig))


def _candidates(
    blocklist: Blocklist, signals: QuerySignals
) -> tuple[list[tuple[int, float, int]], QuerySignals]:
    """The training copy's candidates ``(entry, cosine, PDQ distance)`` as screening finds them,
    and its signals with ``local`` set when its keypoints were verified (as screening: only
    below :data:`~moderation.signals.local_features.SKIP_COSINE`)."""
    from moderation.matching.candidates import find_candidates, merge_verified

    found = find_candidates(
        blocklist,
        TRAINING_CANDIDATES,
        signals.vectors,
        signals.pdq,
        windows=None if signals.windows is None else signals.windows[None],
        window_index=None if signals.windows is None else paste_index(blocklist),
    )
    best = max((c.cosine or -1.0 for c in found), default=None)
    if signals.keypoints is not None and lf.wanted(best) and len(index := local_index(blocklist)):
        local = index.verify(signals.keypoints)
        found = merge_verified(blocklist, found, signals.vectors, local)
        signals = replace(signals, local=local)
    return [
        (c.entry.entry_id, c.cosine or -1.0, 256 if c.pdq_distance is None else c.pdq_distance)
        for c in found
        if c.entry.bank_kind == "block"
    ], signals


def pairs_of(
    query: TrainingQuery,
    source_entry: int | None,
    blocklist: Blocklist,
    regions: RegionLookup,
    background: npt.NDArray[np.float32],
    band: Band,
) -> list[tuple[int, bool, dict[str, float]]]:
    """Labelled ``(entry_id, is_copy, features)`` of one training query: its candidates in the
    bank as it is, and, when it has a source, its candidates with the source left out."""
    found, signals = _candidates(blocklist, query.signals)
    out: list[tuple[int, bool, dict[str, float]]] = []
    variants: list[tuple[int, ...]] = [()]
    if source_entry is not None:
        variants.append((source_entry,))
    for exclude in variants:
        cands = [c for c in found if c[0] not in exclude]
        if not cands:
            continue
        best_cos = max(c[1] for c in cands)
        best_pdq = min(c[2] for c in cands)
        use_views = band.uncertain(
            best_cos, best_pdq if best_pdq < 256 else None, signals.local is not None
        )
        ids = [c[0] for c in cands]
        rows = query_features(
            signals,
            ids,
            blocklist,
            regions,
            background=background,
            exclude=exclude,
            use_views=use_views,
        )
        for entry_id, row in zip(ids, rows, strict=True):
            out.append((entry_id, entry_id == source_entry, row))
    return out


_BACKGROUND_CACHE: dict[tuple[str, str], npt.NDArray[np.float32]] = {}


def background_vectors(runtime: Runtime) -> npt.NDArray[np.float32]:
    """Global vectors of the background set, float32 (b, d) (computed once per process)."""
    directory = runtime.settings.classifier_background_dir
    key = (str(runtime.encoder.id), str(directory))
    if key not in _BACKGROUND_CACHE:
        images = background_images(directory)
        _BACKGROUND_CACHE[key] = runtime.encoder.encode(
            images, batch_size=runtime.settings.batch_size
        )
    return _BACKGROUND_CACHE[key]


def record_training_pairs(
    runtime: Runtime,
    queries: Sequence[TrainingQuery],
    entry_of: dict[str, int],
    *,
    actor: str,
    band: Band | None = None,
) -> int:
    """Search each training copy against the current snapshot and store its labelled pairs
    (``source="synthetic"``, features and the query's ``group`` only); one audit event.
    ``entry_of`` maps a copy's source SHA-256 to the entry made from it. Returns the count."""
    if not queries:
        return 0
    blocklist = runtime.load_blocklist()
    regions = RegionLookup(blocklist)
    background = background_vectors(runtime)
    stored = 0
    with transaction(runtime.sessions) as session:
        for query in queries:
            source = entry_of.get(query.source) if query.source else None
            if query.source is not None and source is None:
                continue  # its image was not added (duplicate)
            for entry_id, is_copy, row in pairs_of(
                query, source, blocklist, regions, background, band or Band()
            ):
                session.add(
                    LabelledPair(
                        entry_id=entry_id,
                        is_copy=is_copy,
                        source="synthetic",
                        features={**row, "group": query.group},
                    )
                )
                stored += 1
        record_event(
            session,
            actor=actor,
            action="classifier.training_pairs",
            details={"pairs": stored, "copies": len(queries)},
        )
    logger.info("stored %d synthetic labelled pairs from %d training copies", stored, len(queries))
    return stored


def import_hooks(runtime: Runtime) -> ImportHooks:
    """The bank importer's hooks when the classifier stage is on: the entry-window embedder, a
    collector of training copies and, after the commit, the search that stores their labelled
    pairs (neither when ``classifier_edits_per_entry`` is 0)."""
    from moderation.matching.classifier.regions import make_region_embedder

    settings = runtime.settings
    budget = None
    if settings.classifier_local_features:
        with runtime.sessions() as session:
            budget = keypoint_budget(session)
    embedder = make_region_embedder(
        runtime.encoder,
        settings.batch_size,
        paste=settings.classifier_feature_windows,
        local=settings.classifier_local_features,
        keypoint_budget=budget,
    )
    if settings.classifier_edits_per_entry == 0:
        return ImportHooks(region_embedder=embedder)
    collector = TrainingCollector(
        runtime.encoder,
        settings.classifier_edits_per_entry,
        background_images(settings.classifier_background_dir),
        batch_size=settings.batch_size,
        window_band=WindowBand(enabled=True) if settings.classifier_windows else None,
        feature_windows=settings.classifier_feature_windows,
        local_features=settings.classifier_local_features,
    )

    def record_pairs(entry_of: dict[str, int], actor: str) -> int:
        return record_training_pairs(runtime, collector.queries, entry_of, actor=actor)

    return ImportHooks(region_embedder=embedder, on_images=collector, after_commit=record_pairs)
