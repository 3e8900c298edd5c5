"""Statements of reasons on a real screening (real encoder, real encrypted bank, the upload-hook
API, a policy whose category cites illegal content), a platform's appeal of that automated
block settled by a reviewer, ``moderation decisions export`` parsed back, and concurrent appeals
and claims on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.config import _default_policies_dir, load_settings
from moderation.governance.appeal_display import open_appeals
from moderation.governance.appeals import (
    AppealConflict,
    AppealNotFound,
    claim_appeal,
    decide_appeal,
    file_appeal,
)
from moderation.governance.review import utc
from moderation.governance.users import create_user
from moderation.matching.decision import ScreeningResult
from moderation.matching.recording import record_result
from moderation.service.api_clients import create_api_client
from moderation.service.callback_urls import callback_policy
from moderation.service.callbacks import deliver_callback
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.queue import process_upload
from moderation.service.runtime import Runtime
from moderation.service.uploads import create_upload
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.decisions import Appeal
from moderation.storage.models import CallbackDelivery, LegalHold, Upload, User
from tests.conftest import Cli, migrated_runtime, skimage_photo_path
from tests.unit.test_api import make_app
from tests.unit.test_callbacks import Receiver

SOR_FIELDS = {
    "decision_ground",
    "automated_detection",
    "automated_decision",
    "content_type",
    "category",
}


def _counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("moderation_appeals_total", {"outcome": outcome}) or 0.0


def _reviewer(rt: Runtime, email: str) -> int:
    with transaction(rt.sessions) as db:
        return create_user(
            db,
            rt.keyring,
            email=email,
            role="reviewer",
            password="correct horse battery staple",
            actor="test",
        ).user_id


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([])
    yield server
    server.close()


def _policy_variant(tmp_path: Path, settings: Any, name: str, **category: Any) -> Any:
    """Settings over a copy of the default policy called ``name`` whose default category has
    ``category``'s fields changed."""
    document = yaml.safe_load((_default_policies_dir() / "default.yaml").read_text())
    document["name"] = name
    document["categories"]["default"].update(category)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / f"{name}.yaml").write_text(yaml.safe_dump(document))
    return load_settings(
        data_dir=settings.data_dir,
        policies_dir=policies,
        policy=name,
        callback_allow_loopback=True,  # the receiver listens on 127.0.0.1
    )


@pytest.fixture
def dsa_runtime(tmp_path: Path, settings: Any) -> Iterator[Runtime]:
    """The default policy with its category's ground set to illegal_content, and a block bank
    holding the coffee photo (real encoder, real snapshot)."""
    dsa = _policy_variant(tmp_path, settings, "dsa", decision_ground="illegal_content")
    with migrated_runtime(dsa) as rt:
        with transaction(rt.sessions) as db:
            create_bank(db, "known-bad")
        import_bank(rt, "known-bad", [skimage_photo_path("coffee")], actor="test")
        yield rt


def _screened_block(rt: Runtime, receiver: Receiver) -> tuple[Any, dict[str, str], str]:
    """The coffee photo posted to the API by a platform and screened by a worker: (test
    client, auth headers, upload id)."""
    allowlist, policy = [receiver.url], callback_policy(rt.settings)
    with transaction(rt.sessions) as db:
        created = create_api_client(
            db, rt.keyring, "acme", callback_allowlist=allowlist, policy=policy
        )
    client = make_app(rt, RecordingDispatcher(), callback_allow_loopback=True).test_client()
    auth = {"Authorization": f"Bearer {created.token}"}
    posted = client.post(
        "/api/v1/screenings",
        data={
            "image": (io.BytesIO(skimage_photo_path("coffee").read_bytes()), "c.png"),
            "external_id": "post-1",
            "subject_id": "user-1",
            "callback_url": receiver.url,
        },
        headers=auth,
        content_type="multipart/form-data",
    )
    assert posted.status_code == 202, posted.get_data(as_text=True)
    upload_id = posted.get_json()["id"]
    process_upload(rt, upload_id, WorkerState(rt, poll_interval=60).screener, max_attempts=3)
    return client, auth, upload_id


def test_automated_block_states_its_reasons_and_an_appeal_upholds_it(
    dsa_runtime: Runtime, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = dsa_runtime
    client, auth, upload_id = _screened_block(rt, receiver)
    result = client.get(f"/api/v1/screenings/{upload_id}", headers=auth).get_json()["result"]
    assert result["decision"] == "block"
    statement = result["statement_of_reasons"]
    assert statement["decision_ground"] == "illegal_content"  # from the policy's category
    assert statement["automated_detection"] is True and statement["automated_decision"] is True
    assert statement["content_type"] == "image" and statement["category"] == "default"
    assert statement["source"] == "screening"
    filed_before, upheld_before = _counted("filed"), _counted("upheld")
    appeal = client.post(
        f"/api/v1/screenings/{upload_id}/appeal", json={"reason": "satire"}, headers=auth
    )
    assert appeal.status_code == 201 and _counted("filed") == filed_before + 1
    # An automated decision: any reviewer may settle the appeal.
    reviewer = _reviewer(rt, "r@example.org")
    with transaction(rt.sessions) as db:
        claim_appeal(
            db, appeal.get_json()["id"], reviewer_id=reviewer, lease_seconds=60, daily_limit=10
        )
    decided = decide_appeal(rt, appeal.get_json()["id"], reviewer_id=reviewer, outcome="upheld")
    assert decided.decision == "block" and _counted("upheld") == upheld_before + 1
    after = client.get(f"/api/v1/screenings/{upload_id}", headers=auth).get_json()
    assert after["result"]["statement_of_reasons"]["source"] == "appeal"
    assert after["result"]["statement_of_reasons"]["automated_decision"] is False
    assert after["result"]["statement_of_reasons"]["decision_ground"] == "illegal_content"
    with rt.sessions() as db:
        deliveries = db.scalars(select(CallbackDelivery).order_by(CallbackDelivery.created_at))
        last = list(deliveries)[-1]
    assert deliver_callback(rt, last.id).state == "delivered"
    body = json.loads(receiver.received[-1][1])
    assert body["event"] == "appeal.decided" and body["appeal"]["outcome"] == "upheld"
    _export_parses_back(Cli(rt.settings.data_dir, monkeypatch), tmp_path)


def _export_parses_back(cli: Cli, tmp_path: Path) -> None:
    """``moderation decisions export``: both decisions, with their fields, in CSV and JSONL."""
    records = cli.json_lines("decisions", "export", "--format", "jsonl")
    assert [(r["source"], r["decision"], r["automated_decision"]) for r in records] == [
        ("screening", "block", True),
        ("appeal", "block", False),
    ]
    assert all(set(r) >= SOR_FIELDS for r in records)
    assert {r["decision_ground"] for r in records} == {"illegal_content"}
    out = tmp_path / "decisions.csv"
    cli("decisions", "export", "--format", "csv", "--out", str(out))
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["automated_decision"] for r in rows] == ["true", "false"]
    assert rows[0]["content_type"] == "image" and rows[0]["external_id"] == "post-1"
    assert rows[1]["decided_by"].startswith("user:")
    late = cli("decisions", "export", "--format", "csv", "--since", "2999-01-01").stdout
    assert late.strip().splitlines() == [",".join(next(csv.reader([late])))]  # header only
    assert "user-1" not in out.read_text()  # no subject ids in the export


# --- concurrency -----------------------------------------------------------------------------


@pytest.fixture
def any_db_runtime(database_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = load_settings(data_dir=tmp_path / "var", database_url=database_url)
    with migrated_runtime(settings) as rt:
        yield rt


def _automated_block(rt: Runtime, decision: str = "block") -> tuple[int, str]:
    """A client's upload with an automated block (or ``decision``), by ``record_result``."""
    with transaction(rt.sessions) as db:
        client = create_api_client(db, rt.keyring, "acme", callback_allowlist=[])
        upload = create_upload(
            db, b"not an image", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir
        )
        upload.client_id = client.client_id
        result = ScreeningResult(
            decision=decision,
            policy="default",
            score=0.9,
            reason=None,
            category="default",
            matches=(),
            timings_ms={"total": 1.0},
            encoder_id="e",
            index_version=1,
            classifier_version=None,
            review_priority=None,
            explanation={},
        )
        record_result(db, upload, result)
        return client.client_id, upload.id


def test_concurrent_appeals_and_claims_have_one_winner(
    any_db_runtime: Runtime, race: Callable[..., dict[int, Any]]
) -> None:
    rt = any_db_runtime
    client_id, upload_id = _automated_block(rt)

    def appeal(n: int) -> str:
        try:
            file_appeal(rt, client_id=client_id, upload_id=upload_id, reason=f"try {n}")
        except AppealConflict:
            return "conflict"
        return "filed"

    outcomes = race(appeal, range(4))
    assert sorted(outcomes.values()) == ["conflict"] * 3 + ["filed"]
    with rt.sessions() as db:
        appeal_id = db.scalar(select(Appeal.id))
        assert db.scalar(select(func.count()).select_from(Appeal)) == 1
    assert appeal_id is not None
    reviewers = [_reviewer(rt, f"r{n}@example.org") for n in range(3)]

    def claim(reviewer: int) -> str:
        try:
            with transaction(rt.sessions) as db:
                claim_appeal(db, appeal_id, reviewer_id=reviewer, lease_seconds=60, daily_limit=9)
        except AppealConflict:
            return "conflict"
        return "claimed"

    claims = race(claim, reviewers)
    assert sorted(claims.values()) == ["claimed", "conflict", "conflict"]


def test_migration_0011_copies_existing_decisions(database_url: str) -> None:
    """A database at 0006 with a blocked screening and a reviewer's not-a-match gets their
    statements of reasons from the migration (SQLite and PostgreSQL)."""
    from sqlalchemy import create_engine, text

    from moderation.storage.db import migrate

    engine = create_engine(database_url)
    migrate(engine, "0006")
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, role, password_hash, disabled, created_at) "
                "VALUES (7, 'r@example.org', 'reviewer', 'x', FALSE, :now)"
            ),
            {"now": now},
        )
        for upload, decision in (("a" * 32, "block"), ("b" * 32, "review")):
            conn.execute(
                text(
                    "INSERT INTO uploads (id, source, received_at, updated_at, status, attempts) "
                    "VALUES (:id, 'api', :now, :now, 'done', 1)"
                ),
                {"id": upload, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO screenings (upload_id, decision, policy, category, timings, "
                    "explanation, created_at) VALUES (:id, :d, 'default', 'default', '{}', "
                    "'{}', :now)"
                ),
                {"id": upload, "d": decision, "now": now},
            )
        conn.execute(
            text(
                "INSERT INTO review_items (upload_id, priority, state, decision, decided_by, "
                "decided_at, created_at) VALUES (:id, 50, 'decided', 'not_a_match', 7, :now, "
                ":now)"
            ),
            {"id": "b" * 32, "now": now},
        )
    migrate(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT upload_id, source, decision, decision_ground, automated_decision, "
                "decided_by, content_type FROM decisions ORDER BY id"
            )
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("a" * 32, "screening", "block", "incompatible_with_terms", True, None, "image"),
        ("b" * 32, "screening", "review", None, True, None, "image"),
        ("b" * 32, "review", "allow", None, False, 7, "image"),
    ]


def test_allow_overturned_to_block_gets_the_legal_hold(tmp_path: Path, settings: Any) -> None:
    held = _policy_variant(tmp_path, settings, "held", legal_hold_days=30, legal_hold_basis="x")
    with migrated_runtime(held) as rt:
        client_id, upload_id = _automated_block(rt, "allow")
        appeal = file_appeal(rt, client_id=client_id, upload_id=upload_id, reason="it is banned")
        reviewer = _reviewer(rt, "r@example.org")
        with transaction(rt.sessions) as db:
            claim_appeal(db, appeal.id, reviewer_id=reviewer, lease_seconds=60, daily_limit=9)
        outcome = decide_appeal(rt, appeal.id, reviewer_id=reviewer, outcome="overturned")
        assert outcome.decision == "block"
        with rt.sessions() as db:
            upload = db.get(Upload, upload_id)
            assert upload is not None and upload.legal_hold_until is not None
            days = (utc(upload.legal_hold_until) - datetime.now(UTC)).total_seconds() / 86400
        assert 29.9 < days <= 30
        hold = db.scalar(select(LegalHold).where(LegalHold.upload_id == upload_id))
        assert hold is not None and (hold.source, hold.placed_by) == ("review", f"user:{reviewer}")


def test_a_reviewer_scoped_to_another_client_never_sees_the_appeal(
    tmp_path: Path, settings: Any
) -> None:
    """Tenant isolation reaches the appeal queue: a reviewer working only client B's items
    neither lists nor claims client A's appeal (as if it did not exist)."""
    with migrated_runtime(settings) as rt:
        client_a, upload_id = _automated_block(rt)
        appeal = file_appeal(rt, client_id=client_a, upload_id=upload_id, reason="ours")
        scoped, free = _reviewer(rt, "b@example.org"), _reviewer(rt, "any@example.org")
        with transaction(rt.sessions) as db:
            other = create_api_client(db, rt.keyring, "platform-b", callback_allowlist=[])
            user = db.get(User, scoped)
            assert user is not None
            user.client_id = other.client_id
        with rt.sessions() as db:
            assert [row.id for row in open_appeals(db, scoped)] == []
            assert [row.id for row in open_appeals(db, free)] == [appeal.id]
        with pytest.raises(AppealNotFound), transaction(rt.sessions) as db:
            claim_appeal(db, appeal.id, reviewer_id=scoped, lease_seconds=60, daily_limit=9)
