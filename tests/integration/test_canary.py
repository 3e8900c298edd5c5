"""The golden-set canary (issue 18 item 2) on a real bank of scikit-image photos, through the
CLI and the library: figures, the encrypted golden set, operator files, SLO refusal of a degraded
classifier model, change triggers, beat schedule and Prometheus gauges."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select

from moderation.config import load_settings
from moderation.matching.classifier.features import FEATURE_NAMES
from moderation.matching.classifier.model import CopyModel
from moderation.service.model_events import add_change_listener, remove_change_listener
from moderation.service.runtime import Runtime
from moderation.storage.modelops import CanaryItem
from moderation.storage.models import AuditEvent, ClassifierModel
from tests.conftest import SKIMAGE_PHOTOS, Cli, assert_nowhere_in, bank_photos, skimage_photo_path

pytestmark = pytest.mark.slow  # real encoder weights, a bank of six photos


@pytest.fixture
def banked(cli: Cli, tmp_path: Path) -> Iterator[Cli]:
    """Bank ``known-bad`` with the six scikit-image photos (golden set: 6 copies, 6 negatives)."""
    bank_photos(cli, tmp_path / "banned", SKIMAGE_PHOTOS)
    yield cli


def cli_runtime(cli: Cli) -> Runtime:
    return Runtime(load_settings(data_dir=cli.data_dir))


def test_canary_on_a_real_bank_gives_sensible_figures_from_a_sealed_golden_set(
    banked: Cli, tmp_path: Path
) -> None:
    report = json.loads(banked("canary", "run", "--json").stdout)
    assert (report["pairs"], report["positives"], report["negatives"]) == (12, 6, 6)
    # Every canary copy of a banked photo is flagged with the right entry; no negative is.
    assert report["recall_review"] == 1.0
    assert 0.5 <= report["recall_block"] <= 1.0
    assert report["false_positive_rate"] == 0.0
    assert report["micro_ap"] >= 0.9
    assert report["passed_slo"] and report["failures"] == []
    # The golden images are sealed: no PNG (or any image) header anywhere in the data dir.
    blobs = list((banked.data_dir / "canary").iterdir())
    assert len(blobs) == 12 and all(b.stat().st_mode & 0o777 == 0o600 for b in blobs)
    assert_nowhere_in(banked.data_dir, [b"\x89PNG\r\n\x1a\n", b"IHDR"])
    status = json.loads(banked("canary", "status").stdout)
    assert status["golden_set"]["by_origin_label"] == {"import/match": 6, "import/no-match": 6}
    assert status["latest_runs"][0]["recall_review"] == 1.0
    # Key rotation re-wraps the golden images' keys: with the old key retired, they still open.
    rotated = json.loads(banked("keys", "rotate", "--retire-old").stdout)
    assert rotated["rewrapped"]["canary_items"] == 12

    # A mislabelled operator file (a banked photo labelled no-match) is a false positive: the
    # run misses the SLO (exit 1) and says so; a correctly labelled copy adds a positive.
    wrong = shutil.copy(skimage_photo_path("chelsea"), tmp_path / "not-really-benign.png")
    banked("canary", "add", str(wrong), "--label", "no-match")
    banked("canary", "add", str(skimage_photo_path("coffee")), "--label", "match", "--bank",
           "known-bad")  # fmt: skip
    result = banked("canary", "run", "--json", ok=False)
    assert result.exit_code == 1
    failed = json.loads(result.stdout)
    assert (failed["positives"], failed["negatives"]) == (7, 7)
    assert failed["false_positive_rate"] == pytest.approx(1 / 7, abs=1e-4)
    assert "max_false_positive_rate" in failed["failures"][0]
    unknown = banked("canary", "add", str(wrong), "--label", "match", "--bank", "nope", ok=False)
    assert unknown.exit_code == 1 and "nope" in unknown.stderr


def test_entry_removal_crypto_shreds_its_golden_copies(banked: Cli) -> None:
    runtime = cli_runtime(banked)
    with runtime.sessions() as session:
        item = session.scalars(select(CanaryItem).where(CanaryItem.label == "match")).first()
        assert item is not None
        entry_id = item.entry_id
    assert entry_id is not None
    from moderation.banks.operations import delete_entries

    delete_entries(runtime, [entry_id], actor="test")
    with runtime.sessions() as session:
        assert session.get(CanaryItem, item.id) is None  # its wrapped key is gone with the row
    blob = banked.data_dir / "canary" / item.blob_ref
    assert blob.exists()
    from moderation.modelops.canary import run_if_changed

    report = run_if_changed(runtime, reason="snapshot")
    assert report is not None and report.positives == 5
    assert not blob.exists()  # the unreadable blob is deleted after the run
    runtime.engine.dispose()


def degraded_model(runtime: Runtime) -> CopyModel:
    """A deliberately degraded classifier: p(copy) ~ 4.5e-5 for every pair (never a copy)."""
    k = len(FEATURE_NAMES)
    return CopyModel(
        version="degraded-never-a-copy",
        encoder_id=str(runtime.encoder.id),
        feature_names=tuple(FEATURE_NAMES),
        mean=np.zeros(k),
        scale=np.ones(k),
        coef=np.zeros(k),
        intercept=-10.0,
        platt_a=1.0,
        platt_b=0.0,
        background=np.zeros((0, runtime.encoder.dim), np.float32),
    )


def test_the_canary_refuses_a_deliberately_degraded_classifier_model(banked: Cli) -> None:
    runtime = cli_runtime(banked)
    model = degraded_model(runtime)
    with runtime.sessions() as session, session.begin():
        session.add(
            ClassifierModel(
                version=model.version,
                encoder_id=model.encoder_id,
                params=model.to_json(),
                metrics={},
                active=False,
            )
        )
    result = banked("classifier", "rollback", "--to", model.version, ok=False)
    assert result.exit_code == 1
    outcome = json.loads(result.stdout)
    assert outcome["refused"] == model.version and outcome["active"] is None
    assert "refused by the canary" in outcome["reason"]
    # Only the classifier safety floor still sends some copies to review; blocks are gone.
    recall = outcome["canary"]["recall_review"]
    assert recall < 0.95 and outcome["canary"]["recall_block"] == 0.0
    assert f"recall at review {recall:.4f} < min_recall 0.95" in outcome["reason"]  # figures
    with runtime.sessions() as session:
        assert not session.scalar(
            select(ClassifierModel.active).where(ClassifierModel.version == model.version)
        )
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "classifier.refuse")
        ).one()
        assert event.details["canary"]["recall_review"] == recall
    runtime.engine.dispose()


def test_changes_request_a_run_and_the_change_check_runs_only_after_one(banked: Cli) -> None:
    from moderation.banks.operations import import_bank
    from moderation.modelops.canary import run_if_changed

    reasons: list[str] = []
    add_change_listener(reasons.append)
    try:
        runtime = cli_runtime(banked)
        assert runtime.policy.slo.min_recall == 0.95
        assert reasons == ["policy"]  # the policy was (re)loaded
        first = run_if_changed(runtime, reason="change")
        assert first is not None and first.passed_slo
        assert run_if_changed(runtime, reason="change") is None  # nothing changed since
        import_bank(runtime, "known-bad", [skimage_photo_path("camera")], actor="test")
        assert "snapshot" in reasons  # the new snapshot version was published
        again = run_if_changed(runtime, reason="change")
        assert again is not None and again.snapshot_version == 2 and again.positives == 7
        runtime.engine.dispose()
    finally:
        remove_change_listener(reasons.append)


def test_canary_gauges_are_exported_and_beat_schedules_the_checks(banked: Cli) -> None:
    from moderation.modelops.gauges import ModelOpsCollector
    from workers.celery_app import CANARY_TASK, DRIFT_TASK, celery_config

    banked("canary", "run", "--json")
    runtime = cli_runtime(banked)
    registry = CollectorRegistry()
    registry.register(ModelOpsCollector(runtime))
    text = generate_latest(registry).decode()
    encoder = str(runtime.encoder.id)
    assert f'moderation_canary_recall{{encoder="{encoder}",threshold="review"}} 1.0' in text
    assert f'moderation_canary_false_positive_rate{{encoder="{encoder}"}} 0.0' in text
    assert f'moderation_canary_micro_ap{{encoder="{encoder}"}}' in text
    assert "moderation_canary_last_run_timestamp_seconds{" in text
    assert "moderation_slo_min_recall 0.95" in text
    assert "moderation_slo_max_false_positive_rate 0.02" in text
    schedule = celery_config(runtime.settings)["beat_schedule"]
    assert schedule["canary"]["task"] == CANARY_TASK
    assert schedule["canary"]["schedule"] == runtime.settings.canary_interval
    assert schedule["canary-change-check"]["args"] == ["change", False]
    assert schedule["drift"]["task"] == DRIFT_TASK and schedule["drift"]["schedule"] == 3600.0
    runtime.engine.dispose()


def _store_older_and_current(runtime: Runtime) -> None:
    """Two stored copies of a degraded model: ``older`` and the active ``current``."""
    from datetime import UTC, datetime, timedelta

    model = degraded_model(runtime)
    now = datetime.now(UTC)
    with runtime.sessions() as session, session.begin():
        for version, age, active in (("older", 2, False), ("current", 1, True)):
            session.add(
                ClassifierModel(
                    version=version,
                    encoder_id=model.encoder_id,
                    params={**model.to_json(), "version": version},
                    metrics={},
                    active=active,
                    created_at=now - timedelta(hours=age),
                )
            )


def test_rollback_goes_to_the_model_stored_before_the_active_one_through_the_canary(
    banked: Cli,
) -> None:
    runtime = cli_runtime(banked)
    _store_older_and_current(runtime)
    result = banked("classifier", "rollback", ok=False)
    outcome = json.loads(result.stdout)
    assert result.exit_code == 1 and outcome["refused"] == "older"
    assert outcome["previous"] == outcome["active"] == "current"
    assert "false-positive rate" in outcome["reason"] and "< min_recall 0.95" in outcome["reason"]
    runtime.engine.dispose()


def test_an_accepted_rollback_notifies_a_classifier_change(cli: Cli) -> None:
    cli("init")  # no bank: an empty golden set measures nothing and refuses nothing
    runtime = cli_runtime(cli)
    _store_older_and_current(runtime)
    reasons: list[str] = []
    add_change_listener(reasons.append)
    try:
        assert json.loads(cli("classifier", "rollback").stdout) == {
            "previous": "current",
            "active": "older",
        }
        assert reasons[-1] == "classifier"
    finally:
        remove_change_listener(reasons.append)
        runtime.engine.dispose()
