"""Training the classifier stage: fit, compare with the active model, activate or refuse.

Training pairs come from two sources: synthetic ones stored at bank import
(:mod:`moderation.matching.classifier.synthetic`) and, with humans, one labelled pair per
matched entry for every final review decision (:mod:`moderation.governance.review_decisions`);
:func:`train` uses both, plus non-copies from edited background photos.

:func:`train` fits a new :class:`~moderation.matching.classifier.model.CopyModel` on a split by
query, compares it with the active model on the same held-out pairs and activates it only when
it is not worse (average precision); every activation and refusal is an audit event.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select, update

from moderation.audit.log import record_event
from moderation.banks.blocklist import Blocklist
from moderation.matching.classifier.features import FEATURE_NAMES, RegionLookup, feature_matrix
from moderation.matching.classifier.model import CopyModel, active_model, evaluate, fit_model
from moderation.matching.classifier.stage import Band
from moderation.matching.classifier.synthetic import (
    TrainingQuery,
    background_images,
    background_vectors,
    edits_for,
    needs_background,
    pairs_of,
    query_signals,
    training_copy,
    training_seed,
)
from moderation.storage.db import transaction
from moderation.storage.models import ClassifierModel, LabelledPair

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

HELD_OUT_SHARE = 0.2
"""Share of queries (groups of pairs) kept out of fitting to compare old and new models."""
CALIBRATION_SHARE = 0.25
"""Share of the fitting queries kept apart for Platt calibration."""
BANNED_BACKGROUND_COSINE = 0.85
"""Background photos this close (global cosine) to a bank entry are left out of the
non-copies: at or above every edited copy's cosine but the hardest (BENCHMARKS.md edits)."""
BACKGROUND_EDITS_PER_IMAGE = 4
"""Edited copies of each background photo used as non-member queries at training time."""


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did: figures on the held-out pairs before (the active model, if any)
    and after (the new model), and whether the new model was activated."""

    version: str
    activated: bool
    reason: str
    before: dict[str, float] | None
    after: dict[str, float]
    pairs: dict[str, int]
    previous_version: str | None
    canary: dict[str, Any] | None = None  # the activation gate's figures, when it ran

    def to_json(self) -> dict[str, Any]:
        """JSON for the CLI."""
        return {
            "version": self.version,
            "activated": self.activated,
            "reason": self.reason,
            "previous_version": self.previous_version,
            "before": self.before,
            "after": self.after,
            "pairs": self.pairs,
            "canary": self.canary,
        }


def _group_of(pair: LabelledPair) -> int:
    group = (pair.features or {}).get("group")
    if isinstance(group, int | float):
        return int(group)
    key = f"upload:{pair.upload_id}" if pair.upload_id else f"pair:{pair.id}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")


def _in_share(group: int, salt: str, share: float) -> bool:
    digest = hashlib.sha256(f"{salt}:{group}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def _background_pairs(
    runtime: Runtime, blocklist: Blocklist, regions: RegionLookup, background: Any, band: Band
) -> list[tuple[int, bool, dict[str, float], int]]:
    images = background_images(runtime.settings.classifier_background_dir)
    # A background photo that is (a copy of) a bank entry would teach "copy" as "non-copy".
    vectors = background_vectors(runtime)
    if len(blocklist):
        hits = blocklist.cosine.search(vectors, 1, BANNED_BACKGROUND_COSINE)
        images = [image for image, found in zip(images, hits, strict=True) if not found]
    copies, groups = [], []
    for i, image in enumerate(images):
        for j, edit in enumerate(edits_for(i, BACKGROUND_EDITS_PER_IMAGE)):
            seed = training_seed(f"background:{i}", edit, j)
            other = images[(i + 1) % len(images)] if len(images) > 1 else None
            if needs_background(edit) and other is None:
                continue
            copies.append(training_copy(edit, image, seed, other))
            groups.append(seed)
    from moderation.matching.classifier.stage import bank_pdq_rank

    rank = bank_pdq_rank(blocklist)
    signals = query_signals(
        copies,
        runtime.encoder,
        batch_size=runtime.settings.batch_size,
        ranks=[rank] * len(copies),
        feature_windows=runtime.settings.classifier_feature_windows,
        local_features=runtime.settings.classifier_local_features,
    )
    out = []
    for group, sig in zip(groups, signals, strict=True):
        query = TrainingQuery(None, group, "background", sig)
        for entry_id, is_copy, row in pairs_of(query, None, blocklist, regions, background, band):
            out.append((entry_id, is_copy, row, group))
    return out


ActivationGate = Callable[[CopyModel], tuple[bool, str, dict[str, Any]]]
"""Checks a model before it is activated: ``(allowed, reason, figures)``; the golden-set
canary's (:func:`moderation.modelops.canary.canary_gate`) refuses a model below the SLOs."""


def train(
    runtime: Runtime,
    *,
    actor: str,
    regularisation: float = 1.0,
    band: Band | None = None,
    gate: ActivationGate | None = None,
) -> TrainReport:
    """Fit a model on every labelled pair with complete features (synthetic and review) plus
    background non-copies, compare it with the active model on held-out queries and activate it
    unless it is worse (lower average precision) or ``gate`` refuses it. Audited
    ``classifier.activate`` or ``classifier.refuse``.

    Raises:
        ValueError: too few pairs of either class to fit, calibrate and evaluate.
    """
    encoder_id = str(runtime.encoder.id)
    blocklist = runtime.load_blocklist()
    regions = RegionLookup(blocklist)
    background = background_vectors(runtime)
    rows, skipped = _stored_rows(runtime)
    for entry_id, is_copy, row, group in _background_pairs(
        runtime, blocklist, regions, background, band or Band()
    ):
        del entry_id
        rows.append((row, is_copy, group, "background"))
    x = feature_matrix([r[0] for r in rows])
    y = np.array([r[1] for r in rows], bool)
    groups = [r[2] for r in rows]
    held = np.array([_in_share(g, "held-out", HELD_OUT_SHARE) for g in groups], bool)
    cal = np.array([_in_share(g, "calibration", CALIBRATION_SHARE) for g in groups], bool) & ~held
    fit = ~held & ~cal
    counts = {
        "total": len(rows),
        "copies": int(y.sum()),
        "synthetic": sum(r[3] == "synthetic" for r in rows),
        "review": sum(r[3] == "review" for r in rows),
        "background": sum(r[3] == "background" for r in rows),
        "skipped_incomplete": skipped,
        "fit": int(fit.sum()),
        "calibration": int(cal.sum()),
        "held_out": int(held.sum()),
    }
    for name, mask in (("held-out", held), ("fitting", fit), ("calibration", cal)):
        if y[mask].all() or not y[mask].any():
            raise ValueError(f"the {name} pairs need both copies and non-copies ({counts})")
    model = fit_model(
        x[fit],
        y[fit],
        calibration=(x[cal], y[cal]),
        encoder_id=encoder_id,
        background=background,
        regularisation=regularisation,
    )
    return _compare_and_store(runtime, model, x[held], y[held], counts, actor=actor, gate=gate)


_Row = tuple[dict[str, float], bool, int, str]  # features, is_copy, group, source


def _stored_rows(runtime: Runtime) -> tuple[list[_Row], int]:
    """The labelled pairs in the database with complete features, and how many were not.
    Pairs stored before the feature-map windows get ``window_to_paste`` = their ``cosine``
    (the feature's value when no window is computed), before local features
    ``local_inliers`` = 0 (not verified)."""
    rows: list[_Row] = []
    skipped = 0
    with runtime.sessions() as session:
        for pair in session.scalars(select(LabelledPair)):
            features = dict(pair.features or {})
            if "window_to_paste" not in features and "cosine" in features:
                features["window_to_paste"] = features["cosine"]
            features.setdefault("local_inliers", 0.0)
            if not all(isinstance(features.get(n), int | float) for n in FEATURE_NAMES):
                skipped += 1
                continue
            rows.append((features, bool(pair.is_copy), _group_of(pair), pair.source))
    return rows, skipped


def _compare_and_store(
    runtime: Runtime,
    model: CopyModel,
    x_held: npt.NDArray[np.float64],
    y_held: npt.NDArray[np.bool_],
    counts: dict[str, int],
    *,
    actor: str,
    gate: ActivationGate | None = None,
) -> TrainReport:
    """Evaluate ``model`` and the active one on the held-out pairs, store ``model`` (active
    unless worse or refused by ``gate``), audit the outcome and report it."""
    encoder_id = str(runtime.encoder.id)
    after = evaluate(model.predict(x_held), y_held)
    with runtime.sessions() as session:
        current = active_model(session, encoder_id)
    before = None if current is None else evaluate(current.predict(x_held), y_held)
    activated, reason, gate_figures = _judge(model, before, after, gate)
    figures = {"held_out": after, "before": before, "pairs": counts, "canary": gate_figures}
    with transaction(runtime.sessions) as session:
        model = CopyModel(**{**model.__dict__, "metrics": {"held_out": after, "pairs": counts}})
        if activated:
            session.execute(update(ClassifierModel).values(active=False))
        session.add(
            ClassifierModel(
                version=model.version,
                encoder_id=encoder_id,
                params=model.to_json(),
                metrics=figures,
                active=activated,
            )
        )
        record_event(
            session,
            actor=actor,
            action="classifier.activate" if activated else "classifier.refuse",
            target=f"classifier:{model.version}",
            outcome="success" if activated else "denied",
            details={
                "reason": reason,
                "previous": current.version if current else None,
                "after": after,
                **figures,
            },
        )
    if activated:
        runtime.notify_change("classifier")  # the canary measures the new model
    logger.info(
        "classifier %s: %s (%s)", model.version, "activated" if activated else "refused", reason
    )
    return TrainReport(
        version=model.version,
        activated=activated,
        reason=reason,
        before=before,
        after=after,
        pairs=counts,
        previous_version=current.version if current else None,
        canary=gate_figures,
    )


def _judge(
    model: CopyModel,
    before: dict[str, float] | None,
    after: dict[str, float],
    gate: ActivationGate | None,
) -> tuple[bool, str, dict[str, Any] | None]:
    """(activate?, reason, the gate's figures): :func:`decide_activation`, then ``gate``."""
    activated, reason = decide_activation(before, after)
    if activated and gate is not None:
        return gate(model)
    return activated, reason, None


def decide_activation(before: dict[str, float] | None, after: dict[str, float]) -> tuple[bool, str]:
    """Activate unless the active model did better on the same held-out pairs (higher average
    precision); the reason names the figures."""
    if before is None:
        return True, "no active model"
    if after["average_precision"] < before["average_precision"]:
        return False, (
            f"held-out average precision {after['average_precision']:.4f} is below the active "
            f"model's {before['average_precision']:.4f}"
        )
    return True, (
        f"held-out average precision {after['average_precision']:.4f} >= the active model's "
        f"{before['average_precision']:.4f}"
    )
