"""``moderation benchmark``: the BENCHMARKS.md quality protocol over the real screening path.

Methods compared in one run, on the same queries:

* ``pdq``: the baseline, PDQ via ``pdqhash``; score = 256 - the smallest Hamming distance over
  the query's 8 dihedral variants (BENCHMARKS.md).
* ``global-cosine``: the production pipeline without the classifier stage: a real bank import
  (encrypted snapshot) and :class:`~moderation.matching.screening.Screener` with the active policy
  (decisions from its thresholds; score = best block-bank cosine).
* ``classifier``: the same pipeline with the classifier stage
(:mod:`moderation.matching.classifier`):
  the bank import also stores entry windows and synthetic labelled pairs (training copies made
  with training seeds, never the queries' :func:`~moderation.benchmark.protocol.query_seed`),
  a model is trained and activated, and decisions come from the policy's probability
  thresholds (score = best block-bank probability). The queries' source photos are the bank's
  own photos, as in the protocol, so the training copies are other edits of the very images the
  positives were made from: its figures are optimistic in that respect.

Screening throughput of ``global-cosine`` and ``classifier`` is also measured in alternating
batches of the same queries (:func:`interleaved_throughput`), so load from other processes falls
on both alike.

Every query is JPEG-encoded once (quality 95) before timing, and every method decodes those
bytes itself, so images/s are comparable end to end (bytes in, decision out).
"""

from __future__ import annotations

import io
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moderation.benchmark import unseen as unseen_split
from moderation.benchmark.protocol import (
    Method,
    MethodResult,
    Protocol,
    build_protocol,
    run_protocol,
)
from moderation.benchmark.report import markdown_table, plot_pr_curves, to_json
from moderation.config import Settings, load_settings
from moderation.media.decode import DecodeLimits, UnscannableImage, decode_image
from moderation.media.implementations import UNSEEN
from moderation.signals.pdq import pdq_hash, pdq_hash_dihedral

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class EncodedQueries:
    """JPEG bytes of every query image, keyed by the image object (encoded once, untimed)."""

    def __init__(self, images: Sequence[Image.Image], quality: int = 95) -> None:
        self._bytes: dict[int, bytes] = {}
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            self._bytes[id(image)] = buffer.getvalue()

    def __call__(self, image: Image.Image) -> bytes:
        return self._bytes[id(image)]


class PdqMethod:
    """PDQ baseline: best reference by Hamming distance over the 8 dihedral variants."""

    name = "pdq"

    def __init__(self, encoded: EncodedQueries, limits: DecodeLimits) -> None:
        self.encoded = encoded
        self.limits = limits
        self.ref_ids: list[str] = []
        self.digests = np.zeros((0, 32), np.uint8)

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        self.ref_ids = [ref_id for ref_id, _ in references]
        self.digests = np.stack(
            [np.frombuffer(pdq_hash(img).digest, np.uint8) for _, img in references]
        )

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        bits = np.unpackbits(self.digests, axis=1)
        answers: list[tuple[str | None, float, str | None]] = []
        for image in images:
            try:
                frame = decode_image(self.encoded(image), self.limits).frames[0]
            except UnscannableImage:
                answers.append((None, 0.0, None))
                continue
            best, best_ref = 257, None
            for variant in pdq_hash_dihedral(frame):
                query_bits = np.unpackbits(np.frombuffer(variant.digest, np.uint8))
                distances = np.count_nonzero(bits != query_bits, axis=1)
                row = int(np.argmin(distances))
                if distances[row] < best:
                    best, best_ref = int(distances[row]), self.ref_ids[row]
            answers.append((best_ref, float(256 - best), None))
        return answers


class ScreeningMethod:
    """The production screening path over a freshly imported, encrypted bank."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        reference_paths: dict[str, Path],
        encoded: EncodedQueries,
        *,
        refiner_factory: Callable[[Any], Any] | None = None,
        train_classifier: bool = False,
    ) -> None:
        self.name = name
        self.settings = settings
        self.reference_paths = reference_paths
        self.encoded = encoded
        self.refiner_factory = refiner_factory
        self.train_classifier = train_classifier
        self.training: dict[str, Any] = {}
        self._screener: Any = None
        self._ref_of_label: dict[str, str] = {}

    def index(self, references: Sequence[tuple[str, Image.Image]]) -> None:
        from moderation.banks.operations import import_bank
        from moderation.banks.records import create_bank
        from moderation.service.runtime import prepared_runtime
        from moderation.storage.db import transaction

        runtime = prepared_runtime(self.settings)
        with transaction(runtime.sessions) as session:
            create_bank(session, "benchmark-references", kind="block")
        paths = [self.reference_paths[ref_id] for ref_id, _ in references]
        by_name = {p.name: ref_id for ref_id, p in self.reference_paths.items()}
        report = import_bank(runtime, "benchmark-references", paths, actor="benchmark")
        if self.train_classifier:
            from moderation.matching.classifier.training import train

            trained = train(runtime, actor="benchmark")
            self.training = {"training_pairs": report.training_pairs, **trained.to_json()}
            logger.info("%s: trained classifier %s", self.name, trained.to_json())
        refiner = self.refiner_factory(runtime) if self.refiner_factory else None
        screener = runtime.screener(refiner=refiner)
        # Every query gets a score: candidates are retrieved down to cosine 0 (decisions still
        # come from the policy's review/block thresholds, which are far above that).
        policy = screener.policy
        screener.policy = policy.model_copy(
            update={"candidates": policy.candidates.model_copy(update={"min_cosine": 0.0})}
        )
        self._screener = screener
        self._ref_of_label = {Path(name).stem: ref for name, ref in by_name.items()}

    def query(self, images: Sequence[Image.Image]) -> list[tuple[str | None, float, str | None]]:
        results = []
        batch = self.settings.batch_size
        for start in range(0, len(images), batch):
            chunk = [self.encoded(img) for img in images[start : start + batch]]
            results.extend(self._screener.screen_bytes(chunk))
        answers: list[tuple[str | None, float, str | None]] = []
        for result in results:
            top = result.explanation.get("candidates") or []
            best = top[0] if top else None
            ref = None
            if best is not None:
                ref = self._ref_of_label.get(self._label_of(best["entry_id"]))
            decision = result.decision if result.decision != "unscannable" else "review"
            answers.append(
                (ref, float(result.score if result.score is not None else 0.0), decision)
            )
        return answers

    def _label_of(self, entry_id: str) -> str:
        info = self._screener.blocklist.entries[int(entry_id.removeprefix("e_"))]
        return str(info.label)


def interleaved_throughput(
    methods: Sequence[ScreeningMethod], images: Sequence[Image.Image], *, chunk: int
) -> dict[str, float]:
    """Images/s of each method over the same images, timed in alternating batches of ``chunk``
    (method A on batch 1, B on batch 1, A on batch 2, ...), so load from other processes on a
    shared machine falls on both alike: BENCHMARKS.md's side-by-side ratio."""
    spent = dict.fromkeys((m.name for m in methods), 0.0)
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        for method in methods:
            began = time.perf_counter()
            method.query(batch)
            spent[method.name] += time.perf_counter() - began
    return {name: len(images) / max(seconds, 1e-9) for name, seconds in spent.items()}


def image_files(directory: Path) -> list[Path]:
    """Image files directly in ``directory``, sorted."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _method_settings(settings: Settings, base: Path, name: str, classifier: bool) -> Settings:
    """``settings`` for method ``name``: its own data dir under ``base`` (fresh database and dev
    keys), with the classifier stage on or off."""
    return load_settings(
        **{
            **settings.model_dump(exclude={"data_dir", "database_url", "key_file", "master_keys"}),
            "data_dir": base / name,
            "classifier": classifier,
        }
    )


def _methods(
    settings: Settings,
    base: Path,
    reference_paths: dict[str, Path],
    encoded: EncodedQueries,
    classifier: bool,
    extra_methods: Callable[[dict[str, Path], EncodedQueries, Path], list[Method]] | None,
) -> list[Method]:
    """PDQ, ``global-cosine``, ``classifier`` when asked, then ``extra_methods``' methods."""
    methods: list[Method] = [
        PdqMethod(encoded, DecodeLimits.from_settings(settings)),
        ScreeningMethod(
            "global-cosine",
            _method_settings(settings, base, "global-cosine", False),
            reference_paths,
            encoded,
        ),
    ]
    if classifier:
        methods.append(
            ScreeningMethod(
                "classifier",
                _method_settings(settings, base, "classifier", True),
                reference_paths,
                encoded,
                train_classifier=True,
            )
        )
    if extra_methods is not None:
        methods.extend(extra_methods(reference_paths, encoded, base))
    return methods


def _screening_throughput(
    methods: Sequence[Method],
    images: Sequence[Image.Image],
    chunk: int,
    echo: Callable[[str], Any],
) -> dict[str, float]:
    """:func:`interleaved_throughput` of ``global-cosine`` and ``classifier`` when both ran
    (else empty), echoed."""
    screening = {m.name: m for m in methods if isinstance(m, ScreeningMethod)}
    if "classifier" not in screening or "global-cosine" not in screening:
        return {}
    speed = interleaved_throughput(
        [screening["global-cosine"], screening["classifier"]], images, chunk=chunk
    )
    echo(
        "screening throughput, interleaved batches of the same queries: global-cosine "
        f"{speed['global-cosine']:.2f} images/s, classifier {speed['classifier']:.2f} "
        f"images/s (ratio {speed['classifier'] / speed['global-cosine']:.2f})"
    )
    return speed


def _classifier_training(
    methods: Sequence[Method], echo: Callable[[str], Any]
) -> dict[str, Any] | None:
    """The first screening method's classifier training report (None if none trained), echoed."""
    training = next(
        (m.training for m in methods if isinstance(m, ScreeningMethod) and m.training), None
    )
    if training:
        echo(
            f"classifier {training['version']}: {training['training_pairs']} synthetic pairs "
            f"at import; held-out {json.dumps(training['after'])}"
        )
    return training


def _write_outputs(
    results: list[MethodResult],
    unseen: list[MethodResult],
    protocol: Protocol,
    extra: dict[str, Any],
    json_out: Path | None,
    plot_out: Path | None,
    echo: Callable[[str], Any],
) -> None:
    if json_out is not None:
        document = to_json(results, protocol, extra=extra)
        document["unseen_implementations"] = unseen_split.to_json(unseen) if unseen else None
        json_out.write_text(json.dumps(document, indent=2))
        echo(f"wrote {json_out}")
    if plot_out is not None:
        plot_pr_curves(results, plot_out)
        echo(f"wrote {plot_out}")


def _print_tables(
    everything: list[MethodResult], echo: Callable[[str], Any]
) -> tuple[list[MethodResult], list[MethodResult]]:
    """The benchmark's own figures and the unseen split's (:func:`unseen.split_results`), each
    echoed as markdown."""
    results, unseen = unseen_split.split_results(everything)
    echo(markdown_table(results))
    if unseen:
        echo(unseen_split.markdown(unseen))
    return results, unseen


def run_quality_benchmark(
    settings: Settings,
    images_dir: Path,
    *,
    json_out: Path | None = None,
    plot_out: Path | None = None,
    n_references: int = 250,
    per_edit: int = 20,
    seed: int = 0,
    echo: Callable[[str], Any] = print,
    extra_methods: Callable[[dict[str, Path], EncodedQueries, Path], list[Method]] | None = None,
    classifier: bool = True,
    unseen_per_implementation: int = 10,
) -> list[MethodResult]:
    """Run the protocol on ``images_dir`` and print a markdown table; optionally JSON and plot.

    ``unseen_per_implementation`` positives and negatives per unseen edit implementation are
    reported apart (:mod:`moderation.benchmark.unseen`); the figures returned leave them out.

    Raises:
        ValueError: too few images in ``images_dir`` for the requested split.
    """
    paths = image_files(images_dir)
    started = time.perf_counter()
    protocol: Protocol = build_protocol(
        paths,
        n_references=n_references,
        positives_per_edit=per_edit,
        negatives_per_edit=per_edit,
        seed=seed,
        unseen=UNSEEN if unseen_per_implementation else (),
        unseen_per_implementation=unseen_per_implementation,
    )
    reference_paths = dict(protocol.references)
    encoded = EncodedQueries([q.image for q in protocol.queries])
    echo(
        f"protocol: {len(protocol.references)} references, {len(protocol.queries)} queries "
        f"({sum(q.true_ref_id is not None for q in protocol.queries)} positives), seed {seed}"
    )
    with tempfile.TemporaryDirectory(prefix="moderation-benchmark-") as tmp:
        methods = _methods(settings, Path(tmp), reference_paths, encoded, classifier, extra_methods)
        results, unseen = _print_tables(run_protocol(protocol, methods), echo)
    images = [q.image for q in protocol.queries]
    speed = _screening_throughput(methods, images, settings.batch_size, echo)
    training = _classifier_training(methods, echo)
    echo(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    extra = {
        "encoder": settings.encoder,
        "policy": settings.policy,
        "seed": seed,
        "classifier_training": training,
        "interleaved_images_per_second": speed,
    }
    _write_outputs(results, unseen, protocol, extra, json_out, plot_out, echo)
    return results
