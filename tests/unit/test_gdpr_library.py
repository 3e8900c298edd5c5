"""GDPR library pieces without services: legal holds, deadlines, previews, late uploads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from moderation.config import load_settings
from moderation.governance.erasure_requests import overdue_requests, register_request
from moderation.governance.gdpr import erase_subject, preview_erasure
from moderation.matching.decision import ScreeningResult
from moderation.matching.policy import PolicyError, load_policy, parse_policy
from moderation.matching.recording import record_result
from moderation.service.runtime import Runtime
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, ErasureRequest

DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def _policy(**category: Any) -> dict[str, Any]:
    document = yaml.safe_load(DEFAULT.read_text())
    document["categories"]["default"].update(category)
    return dict(document)


def test_default_policy_documents_and_disables_the_hold() -> None:
    policy = load_policy(DEFAULT.parent, "default")
    rules = policy.rules_for("default")
    assert rules.legal_hold_days is None and rules.legal_hold_citation is None
    assert "legal_hold_days" in DEFAULT.read_text() and "legal_hold_basis" in DEFAULT.read_text()


@pytest.mark.parametrize(
    ("days", "period"), [(365, "1 year"), (730, "2 years"), (90, "90 days"), (400, "400 days")]
)
def test_citation_names_the_law_and_the_period(days: int, period: str) -> None:
    policy = parse_policy(
        _policy(legal_hold_days=days, legal_hold_basis="18 U.S.C. 2258A (as amended 2024)"),
        source="test",
    )
    assert policy.rules_for("default").legal_hold_citation == (
        f"18 U.S.C. 2258A (as amended 2024): {period}"
    )


def test_a_hold_without_its_legal_basis_is_refused() -> None:
    with pytest.raises(PolicyError, match="legal_hold_basis"):
        parse_policy(_policy(legal_hold_days=365), source="test")
    with pytest.raises(PolicyError, match="legal_hold_days"):
        parse_policy(_policy(legal_hold_days=0, legal_hold_basis="x"), source="test")


def _result(decision: str, hold: int | None) -> ScreeningResult:
    return ScreeningResult(
        decision=decision,
        policy="default",
        score=0.99,
        reason=None,
        category="csam",
        matches=(),
        timings_ms={"total": 1.0},
        encoder_id="test",
        index_version=1,
        classifier_version=None,
        review_priority=None,
        explanation={},
        legal_hold_days=hold,
    )


@pytest.mark.parametrize(
    ("decision", "hold", "held"),
    [("block", 365, True), ("block", None, False), ("allow", 365, False)],
)
def test_block_decisions_in_a_held_category_get_a_hold_date(
    runtime: Runtime, decision: str, hold: int | None, held: bool
) -> None:
    before = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        upload = create_upload(
            session, b"bytes", keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
        )
        record_result(session, upload, _result(decision, hold), actor="worker")
        until = upload.legal_hold_until
        event = session.query(AuditEvent).order_by(AuditEvent.seq.desc()).first()
    assert (until is not None) == held
    if until is not None and hold is not None:
        assert before + timedelta(days=hold) <= until <= datetime.now(UTC) + timedelta(days=hold)
    assert event is not None and event.details["legal_hold_until"] == (
        until.isoformat() if until else None
    )


def test_requests_are_tracked_to_their_deadline(runtime: Runtime) -> None:
    first = register_request(runtime, "subject-1", actor="user:4")
    assert register_request(runtime, "subject-1", actor="user:4") == first  # idempotent
    second = register_request(runtime, "subject-2", actor="user:4")
    with transaction(runtime.sessions) as session:
        row = session.get(ErasureRequest, first)
        assert row is not None
        row.received_at = datetime.now(UTC) - timedelta(days=26)
    with runtime.sessions() as session:
        overdue = overdue_requests(session, days=25)
        assert [r["id"] for r in overdue] == [first] and overdue[0]["age_days"] == 26
        assert {r["id"] for r in overdue_requests(session, days=0)} == {first, second}
    # Erasing the subject (unknown here: nothing was ever uploaded) closes the request.
    receipt = erase_subject(runtime, "subject-1", actor="user:4")
    assert receipt["request_id"] == first and not receipt["subject_known"]
    with runtime.sessions() as session:
        assert [r["id"] for r in overdue_requests(session, days=0)] == [second]
        done = session.get(ErasureRequest, first)
        assert done is not None and done.lookup is None and done.subject_ref == ""
        assert done.plan is None and done.receipt == receipt


def test_preview_and_dry_run_change_nothing(runtime: Runtime) -> None:
    from moderation.audit.log import signing_key
    from moderation.service.subjects import pseudonymize

    with transaction(runtime.sessions) as session:
        signing_key(session, runtime.keyring, create=True)  # as `moderation init` does
        ref = pseudonymize(session, runtime.keyring, "subject-3")
        create_upload(
            session,
            b"photo",
            keyring=runtime.keyring,
            blobs_dir=runtime.settings.blobs_dir,
            subject_ref=ref,
        )
    with runtime.sessions() as session:
        events = session.query(AuditEvent).count()
    counts = preview_erasure(runtime, "subject-3")
    assert counts["uploads"] == 1 and counts["blobs"] == 1 and counts["subject_secrets"] == 1
    dry = erase_subject(runtime, "subject-3", actor="cli", dry_run=True)
    assert dry["dry_run"] and dry["counts"] == counts and dry["signature"]
    with runtime.sessions() as session:
        assert session.query(AuditEvent).count() == events
        assert session.query(ErasureRequest).count() == 0
    assert preview_erasure(runtime, "subject-3") == counts
    with pytest.raises(ValueError):
        preview_erasure(runtime, "")


def test_settings_for_audit_and_erasure_validate() -> None:
    settings = load_settings(audit_checkpoint_every=10, erasure_deadline_days=20)
    assert settings.audit_checkpoint_every == 10 and settings.erasure_deadline_days == 20
    from moderation.config import ConfigurationError

    with pytest.raises(ConfigurationError):
        load_settings(erasure_deadline_days=40)


def test_uploads_arriving_during_an_erasure_are_erased_too(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moderation.governance.gdpr as gdpr
    from moderation.service.subjects import pseudonymize
    from moderation.storage.models import Upload

    def upload_for(subject: str) -> str:
        with transaction(runtime.sessions) as session:
            ref = pseudonymize(session, runtime.keyring, subject)
            return create_upload(
                session,
                b"photo",
                keyring=runtime.keyring,
                blobs_dir=runtime.settings.blobs_dir,
                subject_ref=ref,
            ).id

    first = upload_for("subject-4")
    late: list[str] = []
    original = gdpr._delete_bank_entries

    def meanwhile(rt: Runtime, request_id: str, actor: str) -> None:
        original(rt, request_id, actor)
        if not late:  # the platform sends one more upload after the plan was made
            late.append(upload_for("subject-4"))

    monkeypatch.setattr(gdpr, "_delete_bank_entries", meanwhile)
    receipt = erase_subject(runtime, "subject-4", actor="cli")
    assert receipt["counts"]["uploads"] == 2 and receipt["counts"]["subject_secrets"] == 1
    with runtime.sessions() as session:
        assert session.get(Upload, first) is None and session.get(Upload, late[0]) is None
    assert not list(runtime.settings.blobs_dir.rglob("*.blob"))
