"""The detection-quality protocol of BENCHMARKS.md: references, edited queries, and a runner.

A scaled-down version of the Image Similarity Challenge 2021 protocol (Douze et al. 2021, "The
2021 Image Similarity Dataset and Challenge", arXiv:2106.09672): a set of reference photos stands
for a block bank; queries are edited copies of references (positives), edited copies of photos
outside the references (negatives) and unedited outside photos. Methods are anything that can
index references and answer queries (:class:`Method`), so PDQ, global cosine screening and the
full pipeline are compared on the same queries in the same run.
"""

from __future__ import annotations

import logging
import math
import random
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from moderation.benchmark.metrics import (
    Prediction,
    decision_rates,
    micro_ap,
    per_edit_recall,
    per_edit_recall_at_decisions,
    recall_at_precision,
)
from moderation.media.edits import EDITS, apply_edit, derived_seed
from moderation.media.implementations import IMPLEMENTATIONS, apply_implementation

logger = logging.getLogger(__name__)

UNEDITED = "unedited"
"""The ``edit`` of queries that are unedited non-member photos."""
UNSEEN_PREFIX = "unseen/"
"""Query ids of the unseen-implementation queries start with it (:func:`build_protocol`)."""

_OVERLAY_EDIT = "overlay_bg_60"


@dataclass(frozen=True)
class Query:
    """One query image and its ground truth.

    ``true_ref_id`` is the reference the query was made from (None for a negative), ``source``
    the id of the photo it was made from (a reference or a non-member), ``seed`` the seed its
    edit was applied with (None for unedited queries), and ``background`` the id of the photo
    ``overlay_bg_60`` pasted it onto (None for other edits). Queries made by an unseen edit
    implementation (:mod:`moderation.media.implementations`) have the implementation's name as
    ``edit`` and its family as ``family``; the others have ``family`` None.
    """

    query_id: str
    image: Image.Image
    edit: str
    true_ref_id: str | None
    source: str
    seed: int | None = None
    background: str | None = None
    family: str | None = None


@dataclass(frozen=True)
class Protocol:
    """References (``(ref_id, path)``, loaded by the runner) and in-memory queries, built by
    :func:`build_protocol` from ``seed``."""

    references: tuple[tuple[str, Path], ...]
    queries: tuple[Query, ...]
    seed: int


def _default_load(path: Path) -> Image.Image:
    """Decode a whole image file as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _image_ids(paths: Sequence[Path]) -> list[str]:
    """File stems as ids when they are unique, else the full paths."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def query_seed(seed: int, edit: str, index: int) -> int:
    """The seed of the edit of query ``index`` of ``edit`` under protocol ``seed``: the first 6
    bytes of SHA-256 over a string naming the benchmark, so no other use of ``seed`` (the split,
    classifier training) draws the same numbers."""
    return derived_seed("query", seed, edit, index)


def _check_unseen(unseen: Sequence[str], per_implementation: int, n_references: int) -> bool:
    """Whether any unseen query pastes onto a background, once ``unseen`` is checked.

    Raises:
        ValueError: an unknown or repeated implementation, or more positives than references.
    """
    for name in unseen:
        if name not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}"
            )
    if len(set(unseen)) != len(unseen):
        raise ValueError(f"unseen contains duplicates: {list(unseen)}")
    if unseen and per_implementation > n_references:
        raise ValueError(
            f"unseen_per_implementation={per_implementation} exceeds n_references={n_references}"
        )
    return bool(per_implementation) and any(IMPLEMENTATIONS[n].needs_background for n in unseen)


def _checked_paths(
    image_paths: Sequence[Path],
    edits: Sequence[str],
    n_references: int,
    positives_per_edit: int,
    negatives_per_edit: int,
    unedited_negatives: int,
    unseen: Sequence[str] = (),
    unseen_per_implementation: int = 0,
) -> list[Path]:
    """``image_paths`` sorted, once :func:`build_protocol`'s arguments are checked.

    Raises:
        ValueError: as :func:`build_protocol` documents.
    """
    for name in edits:
        if name not in EDITS:
            raise ValueError(f"unknown edit {name!r}; valid edits: {', '.join(EDITS)}")
    if len(set(edits)) != len(edits):
        raise ValueError(f"edits contains duplicates: {list(edits)}")
    pastes = _check_unseen(unseen, unseen_per_implementation, n_references)
    counts = {
        "n_references": n_references,
        "positives_per_edit": positives_per_edit,
        "negatives_per_edit": negatives_per_edit,
        "unedited_negatives": unedited_negatives,
        "unseen_per_implementation": unseen_per_implementation,
    }
    for key, value in counts.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    paths = sorted(Path(p) for p in image_paths)
    if len(set(paths)) != len(paths):
        raise ValueError("image_paths contains duplicates")
    min_non_members = max(negatives_per_edit, unedited_negatives, unseen_per_implementation)
    if pastes:
        min_non_members = max(min_non_members, 2)
    if _OVERLAY_EDIT in edits and positives_per_edit + negatives_per_edit > 0:
        # Backgrounds are non-members, and a negative's differs from its own source.
        min_non_members = max(min_non_members, 2 if negatives_per_edit else 1)
    if positives_per_edit > n_references:
        raise ValueError(
            f"positives_per_edit={positives_per_edit} exceeds n_references={n_references}"
        )
    if len(paths) < n_references + min_non_members:
        raise ValueError(
            f"{len(paths)} images are too few: {n_references} references + "
            f"{min_non_members} non-members are needed (negatives_per_edit="
            f"{negatives_per_edit}, unedited_negatives={unedited_negatives})"
        )
    return paths


class _Split:
    """``paths`` shuffled by ``random.Random(seed)`` into references (the first
    ``n_references``) and non-members; each photo is loaded once, when a query first needs it."""

    def __init__(
        self, paths: list[Path], n_references: int, seed: int, load: Callable[[Path], Image.Image]
    ) -> None:
        self.paths = paths
        self.seed = seed
        self.ids = _image_ids(paths)
        order = list(range(len(paths)))
        random.Random(seed).shuffle(order)  # noqa: S311 (reproducible split, not security)
        self.reference_ix, self.non_member_ix = order[:n_references], order[n_references:]
        self._load = load
        self._cache: dict[int, Image.Image] = {}

    def image(self, ix: int) -> Image.Image:
        """Photo ``ix``, loaded on first use."""
        if ix not in self._cache:
            self._cache[ix] = self._load(self.paths[ix])
        return self._cache[ix]

    def references(self) -> tuple[tuple[str, Path], ...]:
        """``(ref_id, path)`` of every reference, by id."""
        ids = self.ids
        return tuple(
            (ids[ix], self.paths[ix]) for ix in sorted(self.reference_ix, key=ids.__getitem__)
        )

    def edited_queries(
        self, edit: str, positives: int, negatives: int, *, unseen: bool = False
    ) -> list[Query]:
        """``positives`` then ``negatives`` queries of ``edit`` (an unseen implementation's name
        when ``unseen``): distinct references, then distinct non-members, drawn by the edit's
        own generator (sources first, then each background of a paste in turn)."""
        seed, ids, image, non_member_ix = self.seed, self.ids, self.image, self.non_member_ix
        queries: list[Query] = []
        rng = random.Random(derived_seed("sample", seed, edit, 0))  # noqa: S311
        sources = [(ix, "pos") for ix in rng.sample(self.reference_ix, positives)]
        sources += [(ix, "neg") for ix in rng.sample(non_member_ix, negatives)]
        kind_index = {"pos": 0, "neg": 0}
        pastes = IMPLEMENTATIONS[edit].needs_background
        prefix = UNSEEN_PREFIX if unseen else ""
        for i, (ix, kind) in enumerate(sources):
            q_seed = query_seed(seed, edit, i)
            background_ix = None
            if pastes:
                background_ix = rng.choice([j for j in non_member_ix if j != ix])
            background = None if background_ix is None else image(background_ix)
            if unseen:
                edited = apply_implementation(edit, image(ix), seed=q_seed, background=background)
            else:
                edited = apply_edit(edit, image(ix), seed=q_seed, background=background)
            queries.append(
                Query(
                    query_id=f"{prefix}{edit}/{kind}/{kind_index[kind]}",
                    image=edited,
                    edit=edit,
                    true_ref_id=ids[ix] if kind == "pos" else None,
                    source=ids[ix],
                    seed=q_seed,
                    background=None if background_ix is None else ids[background_ix],
                    family=IMPLEMENTATIONS[edit].family if unseen else None,
                )
            )
            kind_index[kind] += 1
        return queries

    def unedited_queries(self, count: int) -> list[Query]:
        """``count`` distinct non-members as they are, drawn by their own generator."""
        rng = random.Random(derived_seed("sample", self.seed, UNEDITED, 0))  # noqa: S311
        return [
            Query(f"{UNEDITED}/neg/{i}", self.image(ix).copy(), UNEDITED, None, self.ids[ix])
            for i, ix in enumerate(rng.sample(self.non_member_ix, count))
        ]


def _log_protocol(
    references: Sequence[tuple[str, Path]], queries: Sequence[Query], n_images: int, seed: int
) -> None:
    logger.info(
        "protocol: %d references, %d queries (%d positive) from %d images, seed %d",
        len(references),
        len(queries),
        sum(q.true_ref_id is not None for q in queries),
        n_images,
        seed,
    )


def build_protocol(
    image_paths: Sequence[Path],
    *,
    n_references: int = 250,
    positives_per_edit: int = 20,
    negatives_per_edit: int = 20,
    unedited_negatives: int = 100,
    seed: int = 0,
    edits: Sequence[str] = tuple(EDITS),
    load: Callable[[Path], Image.Image] | None = None,
    unseen: Sequence[str] = (),
    unseen_per_implementation: int = 0,
) -> Protocol:
    """Split ``image_paths`` into references and non-members and make the queries.

    The paths are sorted, then shuffled by ``random.Random(seed)``; the first ``n_references``
    are the references, the rest non-members. For each edit (in the order given):
    ``positives_per_edit`` distinct references edited (positives), then ``negatives_per_edit``
    distinct non-members edited (negatives); finally ``unedited_negatives`` distinct non-members
    as they are (edit :data:`UNEDITED`). Each edit samples its sources (and backgrounds) with its
    own generator seeded from ``(seed, edit)``, so adding or removing an edit leaves the queries
    of the others unchanged. Query ``i`` of an edit (positives first) is edited with
    :func:`query_seed` ``(seed, edit, i)``. ``overlay_bg_60`` pastes onto a non-member other than
    the query's own source. Ids are file stems (full paths if stems collide); query ids are
    ``"{edit}/pos/{i}"``, ``"{edit}/neg/{i}"`` and ``"unedited/neg/{i}"``.

    ``unseen`` implementations (:data:`moderation.media.implementations.UNSEEN`) then make
    ``unseen_per_implementation`` positives and negatives each the same way, with ids
    ``"unseen/{name}/pos/{i}"`` (reported apart by :mod:`moderation.benchmark.unseen`).

    Query images are made in memory (2 x 17 x 20 + 100 = 780 of the photos' size by default).

    Args:
        image_paths: photo files, at least ``n_references`` + the non-members needed.
        load: decodes one path to an RGB image; defaults to a full Pillow decode.

    Raises:
        ValueError: an unknown or repeated edit, a repeated path, a negative count, or too few
            images for the counts asked (the message names the numbers).
    """
    paths = _checked_paths(
        image_paths,
        edits,
        n_references,
        positives_per_edit,
        negatives_per_edit,
        unedited_negatives,
        unseen,
        unseen_per_implementation,
    )
    split = _Split(paths, n_references, seed, load or _default_load)
    n = unseen_per_implementation
    queries = [
        q for e in edits for q in split.edited_queries(e, positives_per_edit, negatives_per_edit)
    ]
    queries += [q for name in unseen for q in split.edited_queries(name, n, n, unseen=True)]
    queries += split.unedited_queries(unedited_negatives)
    references = split.references()
    _log_protocol(references, queries, len(paths), seed)
    return Protocol(references=references, queries=tuple(queries), seed=seed)


class Method(typing.Protocol):
    """A near-duplicate detection method under benchmark.

    ``name`` labels it in reports. :meth:`index` receives every reference once, before any
    query; :meth:`query` receives all query images in one call (so a method can batch) and
    returns one ``(best ref_id or None, score, decision or None)`` per image, in order. Scores
    are higher for more similar (any scale; µAP only ranks them). A method that decides
    (``allow``/``review``/``block``/...) returns a decision for every image, else None for all.
    """

    name: str

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        """Index ``(ref_id, RGB image)`` pairs, replacing any previous index."""
        ...

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        """The best reference, its score and the decision for each RGB image, in order."""
        ...


@dataclass
class MethodResult:
    """One method's predictions and figures on a protocol.

    Times are wall-clock seconds; ``images_per_second`` is queries over ``query_seconds``.
    ``threshold_at_p99`` is the score threshold giving ``recall_at_p99`` (None when precision
    0.99 is never reached). ``fpr_block`` and ``negatives_review_rate`` are the shares of
    negative queries decided ``block`` and ``review`` (None when the method gives no
    decisions). ``per_edit_recall`` is at the method's operating point: decision ``block`` or
    ``review`` when it decides, else the P99 threshold.
    """

    name: str
    predictions: list[Prediction]
    index_seconds: float
    query_seconds: float
    images_per_second: float
    micro_ap: float
    recall_at_p99: float
    threshold_at_p99: float | None
    fpr_block: float | None
    negatives_review_rate: float | None
    per_edit_recall: dict[str, float]


def _result(
    name: str,
    protocol: Protocol,
    answers: Sequence[tuple[str | None, float, str | None]],
    index_seconds: float,
    query_seconds: float,
) -> MethodResult:
    if len(answers) != len(protocol.queries):
        raise ValueError(
            f"method {name!r} returned {len(answers)} answers for {len(protocol.queries)} queries"
        )
    predictions = [
        Prediction(q.query_id, ref_id, float(score), q.true_ref_id, q.edit, decision)
        for q, (ref_id, score, decision) in zip(protocol.queries, answers, strict=True)
    ]
    return figures_of(name, predictions, index_seconds, query_seconds)


def figures_of(
    name: str, predictions: list[Prediction], index_seconds: float, query_seconds: float
) -> MethodResult:
    """The :class:`MethodResult` of ``predictions`` (one per query; any subset of a protocol's,
    as :mod:`moderation.benchmark.unseen` makes). ``images_per_second`` is the predictions'
    count over ``query_seconds``.

    Raises:
        ValueError: decisions for only some predictions, or no positive query.
    """
    n_decided = sum(p.decision is not None for p in predictions)
    if 0 < n_decided < len(predictions):
        raise ValueError(
            f"method {name!r} gave decisions for {n_decided} of {len(predictions)} queries; "
            "a method gives a decision for every query or for none"
        )
    recall, threshold = recall_at_precision(predictions, 0.99)
    fpr_block = review_rate = None
    if n_decided:
        negatives = decision_rates(predictions)["negatives"]
        fpr_block = negatives.get("block", 0.0)
        review_rate = negatives.get("review", 0.0)
        edit_recall = per_edit_recall_at_decisions(predictions)
    else:
        edit_recall = per_edit_recall(predictions, math.inf if threshold is None else threshold)
    return MethodResult(
        name=name,
        predictions=predictions,
        index_seconds=index_seconds,
        query_seconds=query_seconds,
        # The floor keeps the rate finite for toy methods faster than the clock's resolution.
        images_per_second=len(predictions) / max(query_seconds, 1e-9),
        micro_ap=micro_ap(predictions),
        recall_at_p99=recall,
        threshold_at_p99=threshold,
        fpr_block=fpr_block,
        negatives_review_rate=review_rate,
        per_edit_recall=edit_recall,
    )


def run_protocol(
    protocol: Protocol,
    methods: Sequence[Method],
    *,
    progress: bool = True,
    load: Callable[[Path], Image.Image] | None = None,
) -> list[MethodResult]:
    """Run each method on the protocol: index the references, then query every query in one
    timed call, and compute the figures of BENCHMARKS.md.

    References are decoded once (with ``load``, a full Pillow RGB decode by default) and shared by
    all methods. ``progress`` logs each step at INFO level instead of DEBUG.

    Raises:
        ValueError: a method returned a different number of answers than queries, decisions for
            only some queries, or the protocol has no positive query.
    """
    level = logging.INFO if progress else logging.DEBUG
    load_image = load or _default_load
    references = [(ref_id, load_image(path)) for ref_id, path in protocol.references]
    images = [q.image for q in protocol.queries]
    results: list[MethodResult] = []
    for method in methods:
        logger.log(level, "%s: indexing %d references", method.name, len(references))
        start = time.perf_counter()
        method.index(references)
        index_seconds = time.perf_counter() - start
        logger.log(level, "%s: querying %d images", method.name, len(images))
        start = time.perf_counter()
        answers = method.query(images)
        query_seconds = time.perf_counter() - start
        result = _result(method.name, protocol, answers, index_seconds, query_seconds)
        logger.log(
            level,
            "%s: µAP %.3f, R@P99 %.3f, %.1f images/s",
            method.name,
            result.micro_ap,
            result.recall_at_p99,
            result.images_per_second,
        )
        results.append(result)
    return results
