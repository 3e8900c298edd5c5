"""The ages the alert rules watch, on ``/metrics``: oldest queued upload, snapshot age per bank,
worker snapshot lag, master-key age and overdue erasure requests
(:mod:`moderation.governance.health_metrics`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update

from admin import create_app
from moderation.banks.hash_import import import_hash_list
from moderation.banks.records import create_bank
from moderation.config import load_settings
from moderation.governance.keys import rotate_keys
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import (
    AuditEvent,
    ErasureRequest,
    IndexSnapshot,
    Upload,
    WorkerHeartbeat,
)

TOKEN = "scrape-" + "abcdefghijklmnopqrstuvwxyz0123456789"
PDQ = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def scrape(runtime: Runtime) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    settings = load_settings(data_dir=runtime.settings.data_dir, metrics_token=TOKEN)
    client = create_app({"SETTINGS": settings, "TESTING": True}).test_client()
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def test_ages_are_exported(runtime: Runtime, tmp_path: Path) -> None:
    day = timedelta(days=1)
    with transaction(runtime.sessions) as db:
        create_bank(db, "hashes")
    listing = tmp_path / "list.txt"
    listing.write_text(f"pdq {PDQ}\n", encoding="utf-8")
    import_hash_list(runtime, "hashes", listing, actor="test")
    old_key = runtime.keyring.primary_id
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as db:
        db.add(Upload(status="queued", received_at=now - timedelta(seconds=600)))
        db.add(Upload(status="done", received_at=now - 3 * day))
        db.add(WorkerHeartbeat(id="w:1", hostname="w", pid=1, encoder_id="e", snapshot_version=0))
        db.add(ErasureRequest(subject_ref="x", requested_by="cli", received_at=now - 30 * day))
        db.execute(update(IndexSnapshot).values(created_at=now - 2 * day))
        # A deployment started 100 days ago (the append-only trigger dropped to backdate it).
        db.execute(text("DROP TRIGGER audit_events_no_update"))
        db.execute(update(AuditEvent).values(ts=now - 100 * day))
    before = scrape(runtime)
    assert 590 < before[("moderation_oldest_queued_upload_seconds", ())] < 700
    assert before[("moderation_snapshot_age_seconds", (("bank", "hashes"),))] > 2 * 86400 - 60
    assert before[("moderation_worker_snapshot_lag_seconds", (("worker", "w:1"),))] > 86400
    assert before[("moderation_key_age_seconds", (("key", old_key),))] > 99 * 86400
    assert before[("moderation_erasure_requests_overdue", ())] == 1

    report = rotate_keys(runtime, retire_old=False, actor="test")
    runtime.reload_keyring()
    after = scrape(runtime)
    assert after[("moderation_key_age_seconds", (("key", report.primary),))] < 60
    with transaction(runtime.sessions) as db:
        db.execute(update(Upload).values(status="done"))
    assert scrape(runtime)[("moderation_oldest_queued_upload_seconds", ())] == 0
