"""Issue 14, item 6 in the console: a reviewer's confirm places the hold an automatic block
places; admins and the DPO place and release manual holds (with reasons, audited)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from moderation.config import Settings, load_settings
from moderation.governance.review import claim_next
from moderation.governance.review_decisions import decide
from moderation.matching.recording import place_block_hold
from moderation.service.runtime import Runtime
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, LegalHold, ReviewItem, Upload
from tests.unit.console.conftest import SECRET_KEY

REPO_ROOT = Path(__file__).resolve().parents[3]
HOLD_DAYS = 365


@pytest.fixture
def console_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The console's settings with a policy whose default category holds blocks for a year."""
    document = yaml.safe_load((REPO_ROOT / "policies" / "default.yaml").read_text())
    document["categories"]["default"]["legal_hold_days"] = HOLD_DAYS
    document["categories"]["default"]["legal_hold_basis"] = "18 U.S.C. 2258A"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(yaml.safe_dump(document))
    return load_settings(
        data_dir=settings.data_dir,
        secret_key=SECRET_KEY,
        console_login_rate_limit="1000 per minute",
        policies_dir=policies,
    )


def _settle(rt: Runtime, reviewer: int, decision: str) -> str:
    with transaction(rt.sessions) as db:
        item = claim_next(db, reviewer_id=reviewer, lease_seconds=600, daily_limit=100)
        assert item is not None
        item_id, upload_id = item.id, item.upload_id
    decide(rt, item_id, reviewer_id=reviewer, decision=decision)
    return upload_id


def test_reviewer_confirm_places_the_hold_an_automatic_block_places(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    make_review_item(), make_review_item()
    confirmed = _settle(rt, reviewer.id, "confirm")
    allowed = _settle(rt, reviewer.id, "not_a_match")
    # The hold a block of the same category places, for comparison.
    with transaction(rt.sessions) as db:
        other = create_upload(db, b"x", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir)
        automatic = place_block_hold(
            db, other, days=HOLD_DAYS, category="default", source="automatic", actor="worker"
        )
        expected_reason, expected_until = automatic.reason, automatic.until
    with rt.sessions() as db:
        (hold,) = db.scalars(select(LegalHold).where(LegalHold.upload_id == confirmed)).all()
        upload = db.get(Upload, confirmed)
        assert upload is not None and upload.legal_hold_until is not None
        assert db.get(Upload, allowed).legal_hold_until is None  # type: ignore[union-attr]
        assert not db.scalars(select(LegalHold).where(LegalHold.upload_id == allowed)).all()
        event = db.scalar(select(AuditEvent).where(AuditEvent.action == "hold.place"))
    assert hold.source == "review" and hold.placed_by == f"user:{reviewer.id}"
    assert hold.reason == expected_reason
    until = hold.until.replace(tzinfo=UTC) if hold.until.tzinfo is None else hold.until
    assert abs(until - expected_until) < timedelta(minutes=1)
    assert abs(until - (datetime.now(UTC) + timedelta(days=HOLD_DAYS))) < timedelta(minutes=1)
    assert event is not None and event.target == f"upload:{confirmed}"


def test_admin_places_and_dpo_releases_a_manual_hold(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
    console_runtime: Runtime,
) -> None:
    rt = console_runtime
    item = make_review_item()
    with rt.sessions() as db:
        upload_id = db.get(ReviewItem, item).upload_id  # type: ignore[union-attr]
    admin = make_user("admin")
    client.login(admin)
    refused = client.form(
        "/holds", {"upload_id": upload_id, "days": "30", "reason": ""}, token_from="/holds"
    )
    assert refused.status_code == 400
    placed = client.form(
        "/holds",
        {"upload_id": upload_id, "days": "30", "reason": "court order 44"},
        token_from="/holds",
    )
    assert placed.status_code == 302
    with rt.sessions() as db:
        hold = db.scalars(select(LegalHold)).one()
        assert (hold.source, hold.reason, hold.placed_by) == (
            "manual",
            "court order 44",
            f"user:{admin.id}",
        )
    assert "court order 44" in client.get("/holds").get_data(as_text=True)

    dpo_client = new_client()
    dpo_client.login(make_user("dpo"))
    released = dpo_client.form(
        f"/holds/{hold.id}/release", {"reason": "order lifted"}, token_from="/holds"
    )
    assert released.status_code == 302
    with rt.sessions() as db:
        row = db.get(LegalHold, hold.id)
        assert row is not None and row.release_reason == "order lifted"
        assert db.get(Upload, upload_id).legal_hold_until is None  # type: ignore[union-attr]
        actions = list(db.scalars(select(AuditEvent.action)))
    assert "hold.place" in actions and "hold.release" in actions
