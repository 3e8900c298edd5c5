"""The classifier stage end to end with the real encoder: import (entry windows, synthetic
pairs), training and activation, screening with the model, review decisions becoming labelled
pairs, and a worse retrained model refused (audited)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

import moderation.matching.classifier.training as training_module
from moderation.banks.keypoint_rows import KEYPOINT_ROW
from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.config import load_settings
from moderation.governance.review import claim_next
from moderation.governance.review_decisions import decide
from moderation.matching.classifier.features import FEATURE_NAMES
from moderation.matching.classifier.model import CopyModel, fit_model
from moderation.matching.classifier.regions import ENTRY_WINDOWS
from moderation.matching.classifier.training import train
from moderation.media.edits import apply_edit
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.signals.local_features import packed_rows, unpack
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, ClassifierModel, LabelledPair, Screening
from tests.conftest import skimage_photo, skimage_photo_path

BANNED = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera")


def actions(rt: Runtime) -> list[str]:
    with rt.sessions() as db:
        return list(db.scalars(select(AuditEvent.action)))


def test_import_train_screen_review_and_refuse_a_worse_model(
    console_runtime: Runtime,
    make_user: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Six training copies per photo: enough copies for a held-out split of a six-photo bank.
    settings = console_runtime.settings
    rt = Runtime(load_settings(**{**settings.model_dump(), "classifier_edits_per_entry": 6}))
    with transaction(rt.sessions) as db:
        create_bank(db, "known")
    report = import_bank(rt, "known", [skimage_photo_path(n) for n in BANNED], actor="test")
    assert len(report.added) == len(BANNED) and report.training_pairs > 0
    blocklist = rt.load_blocklist()
    for entry_id in report.added:
        # The entry windows, then the paste descriptor of the feature-map windows (on by
        # default: moderation.banks.paste_rows), then the packed SIFT keypoints (local features,
        # on by default: moderation.banks.keypoint_rows).
        regions = blocklist.regions_of(entry_id)
        assert len(ENTRY_WINDOWS) + 1 == KEYPOINT_ROW and regions.shape[1] == rt.encoder.dim
        keypoints = unpack(regions[KEYPOINT_ROW:])
        assert len(keypoints) > 20
        assert len(regions) == KEYPOINT_ROW + packed_rows(len(keypoints), rt.encoder.dim)
    with rt.sessions() as db:
        pairs = db.scalars(select(LabelledPair).where(LabelledPair.source == "synthetic")).all()
        assert len(pairs) == report.training_pairs
        assert any(p.is_copy for p in pairs) and not all(p.is_copy for p in pairs)
        assert all(set(FEATURE_NAMES) <= set(p.features) for p in pairs)
        assert all(p.upload_id is None for p in pairs)  # features only, no image behind them

    # A queue worker that loaded the bank before any model existed screens without the stage...
    worker = WorkerState(rt, poll_interval=0.0)
    assert worker.screener().refiner is None

    first = train(rt, actor="test")
    assert first.activated and first.before is None and first.pairs["background"] > 0
    # ...and picks the activated model up at its next check, without a restart.
    assert getattr(worker.screener().refiner, "version", None) == first.version
    assert first.after["average_precision"] > 0.8, first.after

    # Screening now runs the stage: probability on matches, its version on the result. The
    # policy is widened so that every candidate goes to review (to get a review item): no
    # cosine blocks, and the classifier (whose probability may reach 1.0 on this copy) may
    # not raise a review-level match.
    default = rt.policy.categories["default"]
    rules = default.model_copy(
        update={
            "block_cosine": 1.0,
            "block_probability": 1.0,
            "review_probability": 0.0,
            "classifier_band": default.classifier_band.model_copy(update={"max_raise": 0}),
        }
    )
    rt.__dict__["policy"] = rt.policy.model_copy(update={"categories": {"default": rules}})
    query = tmp_path / "astronaut-meme.jpg"
    apply_edit("meme_caption", skimage_photo("astronaut"), seed=7).save(query, quality=90)
    results = screen_paths(rt, [query], on_result=lambda _: None, actor="test")
    assert results[0].classifier_version == first.version
    assert results[0].decision == "review" and results[0].matches
    top = results[0].matches[0]
    assert top.probability is not None and top.probability > 0.5
    assert top.entry.label == "astronaut" and "classifier" in top.signals
    with rt.sessions() as db:
        screening = db.scalars(select(Screening)).one()
        assert screening.classifier_version == first.version

    # The reviewer confirms: one labelled pair per match, with the stage's features.
    reviewer = make_user("reviewer")
    with transaction(rt.sessions) as db:
        item = claim_next(db, reviewer_id=reviewer.id, lease_seconds=60, daily_limit=100)
        assert item is not None
        item_id = item.id
    outcome = decide(rt, item_id, reviewer_id=reviewer.id, decision="confirm")
    assert outcome.labelled_pairs == len(results[0].matches)
    with rt.sessions() as db:
        reviewed = db.scalars(select(LabelledPair).where(LabelledPair.source == "review")).all()
        assert len(reviewed) == outcome.labelled_pairs
        assert all(p.is_copy for p in reviewed)
        assert all(set(FEATURE_NAMES) <= set(p.features) for p in reviewed)

    # A model that ranks nothing (its weights zeroed after fitting: constant probabilities) is
    # worse on the held-out pairs: stored, not activated. (A strongly regularised model is not
    # reliably worse: shrinking the weights keeps their ranking, and a held-out AP of 1.0 ties.)
    def ranks_nothing(*args: Any, **kwargs: Any) -> CopyModel:
        fitted = fit_model(*args, **kwargs)
        return dataclasses.replace(fitted, coef=np.zeros_like(fitted.coef))

    monkeypatch.setattr(training_module, "fit_model", ranks_nothing)
    second = train(rt, actor="test")
    assert second.pairs["review"] == outcome.labelled_pairs
    assert not second.activated and second.previous_version == first.version
    assert second.after["average_precision"] < second.before["average_precision"]  # type: ignore[index]
    with rt.sessions() as db:
        active = db.scalars(select(ClassifierModel).where(ClassifierModel.active)).all()
        assert [m.version for m in active] == [first.version]
        refused = db.scalars(
            select(AuditEvent).where(AuditEvent.action == "classifier.refuse")
        ).one()
        assert refused.target == f"classifier:{second.version}"
        assert refused.outcome == "denied"
    assert actions(rt).count("classifier.activate") == 1
    assert "classifier.training_pairs" in actions(rt)
