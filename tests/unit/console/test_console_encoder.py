"""The console's encoder page: admins start a migration, promote and roll back (audited with
the admin as actor); auditors only read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank_audited
from moderation.config import Settings
from moderation.modelops.encoder_migration import run_migration
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.encoders import EncoderMigration
from moderation.storage.models import AuditEvent
from tests.conftest import skimage_photo
from tests.tiny_clip import relaxed_slo_policies, tiny_clip_encoder


@pytest.fixture
def console_settings(console_settings: Settings, tmp_path: Path) -> Settings:
    """The console's settings with SLOs the tiny test encoder meets (the canary gate runs)."""
    policies = relaxed_slo_policies(tmp_path / "policies")
    return console_settings.model_copy(update={"policies_dir": policies})


def _migration(runtime: Runtime) -> EncoderMigration:
    with runtime.sessions() as db:
        row = db.scalars(select(EncoderMigration)).one()
        db.expunge(row)
        return row


def test_admin_migrates_promotes_and_rolls_back_auditor_reads(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tiny_clip_encoder(tmp_path / "clip", monkeypatch)
    folder = tmp_path / "bank"
    folder.mkdir()
    skimage_photo("chelsea").convert("RGB").save(folder / "chelsea.jpg", quality=90)
    with transaction(console_runtime.sessions) as db:
        create_bank_audited(
            db, "kept", kind="block", category="default", actor="test", retain_originals=True
        )
    import_bank(console_runtime, "kept", [folder], actor="test")

    admin = make_user("admin")
    client.login(admin)
    page = client.get("/encoder").get_data(as_text=True)
    assert "kept" in page and console_runtime.settings.encoder in page
    assert (
        client.form("/encoder/migrate", {"target": target}, token_from="/encoder").status_code
        == 302
    )
    assert _migration(console_runtime).state == "running"
    run_migration(console_runtime, _migration(console_runtime).id)  # the workers' job
    page = client.get("/encoder").get_data(as_text=True)
    assert 'id="promote"' in page and "1/1 retained originals embedded" in page

    assert (
        client.form("/encoder/promote", {"confirm": "1"}, token_from="/encoder").status_code == 302
    )
    assert _migration(console_runtime).state == "promoted"
    with console_runtime.sessions() as db:
        promoted = db.scalars(
            select(AuditEvent).where(AuditEvent.action == "encoder.promote")
        ).one()
    assert promoted.details["canary"]["pairs"] > 0  # the gate ran the canary
    assert (
        client.form("/encoder/rollback", {"confirm": "1"}, token_from="/encoder").status_code == 302
    )
    assert _migration(console_runtime).state == "rolled_back"
    with console_runtime.sessions() as db:
        events = db.scalars(select(AuditEvent).where(AuditEvent.action.like("encoder.%"))).all()
    actions = {(e.action, e.actor) for e in events}
    for action in ("encoder.migrate", "encoder.promote", "encoder.rollback"):
        assert (action, f"user:{admin.id}") in actions

    client = new_client()
    client.login(make_user("auditor"))
    assert client.get("/encoder").status_code == 200
    token = client.token("/encoder")
    response = client.post("/encoder/promote", data={"confirm": "1", "csrf_token": token})
    assert response.status_code == 403
    assert _migration(console_runtime).state == "rolled_back"
