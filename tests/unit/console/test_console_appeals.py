"""Appeals end to end through the real Flask app (upload-hook API + console) and SQLite: the
platform appeals a reviewer's decision, the reviewer who made it can neither claim nor decide
the appeal, another reviewer overturns it; the result changes, the signed ``appeal.decided``
callback is delivered and the outcome counted. Also: what may not be appealed, and the
statements-of-reasons download."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from moderation.config import Settings
from moderation.governance.appeals import AppealForbidden, decide_appeal
from moderation.governance.review import claim_next
from moderation.governance.review_decisions import current_decision, decide
from moderation.service.api_clients import create_api_client
from moderation.service.callback_urls import callback_policy
from moderation.service.callbacks import SIGNATURE_HEADER, deliver_callback
from moderation.service.platform_client import verify_callback
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.decisions import Appeal
from moderation.storage.models import AuditEvent, CallbackDelivery, ReviewItem, Upload
from tests.conftest import loopback_callbacks
from tests.unit.console.conftest import ConsoleClient, ConsoleUser
from tests.unit.test_callbacks import Receiver


def _counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("moderation_appeals_total", {"outcome": outcome})
    return value or 0.0


@pytest.fixture
def console_settings(console_settings: Settings) -> Settings:
    """The callback receiver listens on 127.0.0.1: the development loopback setting."""
    return loopback_callbacks(console_settings)


@pytest.fixture
def receiver() -> Any:
    server = Receiver([])
    yield server
    server.close()


def _platform(rt: Runtime, item_id: int, url: str, name: str = "acme") -> tuple[str, str, str]:
    """An API client owning the review item's upload, with ``url`` as its callback URL:
    (bearer token, callback secret, upload id)."""
    with transaction(rt.sessions) as db:
        created = create_api_client(
            db, rt.keyring, name, callback_allowlist=[url], policy=callback_policy(rt.settings)
        )
        item = db.get(ReviewItem, item_id)
        assert item is not None
        upload = db.get(Upload, item.upload_id)
        assert upload is not None
        upload.client_id, upload.callback_url, upload.source = created.client_id, url, "api"
        return created.token, created.callback_secret, upload.id


def _review(rt: Runtime, item_id: int, reviewer: ConsoleUser, decision: str) -> None:
    with transaction(rt.sessions) as db:
        claimed = claim_next(db, reviewer_id=reviewer.id, lease_seconds=600, daily_limit=100)
        assert claimed is not None and claimed.id == item_id
    decide(rt, item_id, reviewer_id=reviewer.id, decision=decision)


def _appeal(client: ConsoleClient, token: str, upload_id: str, reason: str) -> Any:
    return client.post(
        f"/api/v1/screenings/{upload_id}/appeal",
        json={"reason": reason},
        headers={"Authorization": f"Bearer {token}"},
    )


def _screening(client: ConsoleClient, token: str, upload_id: str) -> dict[str, Any]:
    got = client.get(
        f"/api/v1/screenings/{upload_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert got.status_code == 200, got.get_data(as_text=True)
    body: dict[str, Any] = got.get_json()
    return body


def _deliver_last(rt: Runtime, receiver: Receiver) -> dict[str, Any]:
    """Deliver the newest callback and return the body the receiver got (signature checked)."""
    with rt.sessions() as db:
        delivery = db.scalars(
            select(CallbackDelivery).order_by(CallbackDelivery.created_at.desc())
        ).first()
        assert delivery is not None
    assert deliver_callback(rt, delivery.id).state == "delivered"
    _headers, body = receiver.received[-1]
    payload: dict[str, Any] = json.loads(body)
    return payload


def test_appeal_goes_to_another_reviewer_who_overturns_it(
    client: ConsoleClient,
    new_client: Callable[[], ConsoleClient],
    console_runtime: Runtime,
    make_user: Callable[..., ConsoleUser],
    make_review_item: Callable[..., int],
    receiver: Receiver,
) -> None:
    rt = console_runtime
    first, second = make_user("reviewer"), make_user("reviewer")
    item_id = make_review_item()
    token, secret, upload_id = _platform(rt, item_id, receiver.url)
    _review(rt, item_id, first, "confirm")
    before = _screening(client, token, upload_id)["result"]["statement_of_reasons"]
    assert before["decision"] == "block" and before["source"] == "review"
    assert before["automated_decision"] is False and before["automated_detection"] is True
    assert before["decision_ground"] == "incompatible_with_terms"
    assert before["content_type"] == "image" and before["category"] == "default"
    overturned_before = _counted("overturned")

    filed = _appeal(client, token, upload_id, "This is our own photo, <b>licensed</b>.")
    assert filed.status_code == 201, filed.get_data(as_text=True)
    appeal = filed.get_json()
    assert appeal["state"] == "open" and appeal["original_decision"] == "block"
    assert _appeal(client, token, upload_id, "again").status_code == 409

    _decider_is_refused(client, rt, first, appeal["id"])
    other = new_client()
    other.login(second)
    page = f"/review/appeals/{appeal['id']}"
    assert other.form(f"{page}/claim", {}, token_from=page).status_code == 302
    shown = other.get(page).get_data(as_text=True)
    assert "Overturn (allow)" in shown and "incompatible_with_terms" in shown
    assert other.get(f"{page}/image").status_code == 200
    assert other.get(f"{page}/image?variant=full").status_code == 403  # not revealed yet
    assert other.form(f"{page}/reveal", {}, token_from=page).status_code == 302
    assert other.get(f"{page}/image?variant=full").status_code == 200
    done = other.form(f"{page}/decide", {"outcome": "overturned"}, token_from=page)
    assert done.status_code == 302

    _platform_hears_overturn(client, rt, token, secret, upload_id, receiver)
    assert _counted("overturned") == overturned_before + 1
    with rt.sessions() as db:
        actions = set(db.scalars(select(AuditEvent.action)).all())
        decide_event = db.scalar(select(AuditEvent).where(AuditEvent.action == "appeal.decide"))
    assert {"appeal.file", "appeal.claim", "appeal.reveal", "appeal.decide"} <= actions
    assert decide_event is not None and decide_event.actor == f"user:{second.id}"
    assert "licensed" not in json.dumps(decide_event.details)  # the reason stays out of the log
    # An appeal's outcome is final.
    assert _appeal(client, token, upload_id, "once more").status_code == 409
    admin = new_client()
    admin.login(make_user("admin"))
    dashboard = admin.get("/dashboard").get_data(as_text=True)
    assert 'id="appeals-open">0<' in dashboard and 'id="appeals-overturned">1<' in dashboard


def _decider_is_refused(
    client: ConsoleClient, rt: Runtime, decider: ConsoleUser, appeal_id: str
) -> None:
    """The reviewer who made the decision sees the appeal (reason, decision) but may neither
    take nor settle it."""
    client.login(decider)
    queue = client.get("/review").get_data(as_text=True)
    assert "&lt;b&gt;licensed&lt;/b&gt;" in queue and "you made this decision" in queue
    page = f"/review/appeals/{appeal_id}"
    assert client.form(f"{page}/claim", {}, token_from=page).status_code == 302
    with rt.sessions() as db:
        row = db.get(Appeal, appeal_id)
        assert row is not None and row.state == "open" and row.claimed_by is None
    with pytest.raises(AppealForbidden):
        decide_appeal(rt, appeal_id, reviewer_id=decider.id, outcome="overturned")


def _platform_hears_overturn(
    client: ConsoleClient,
    rt: Runtime,
    token: str,
    secret: str,
    upload_id: str,
    receiver: Receiver,
) -> None:
    """The result now says allow (decided on appeal by a person), and the signed callback
    ``appeal.decided`` carries the outcome."""
    view = _screening(client, token, upload_id)
    statement = view["result"]["statement_of_reasons"]
    assert statement["decision"] == "allow" and statement["source"] == "appeal"
    assert statement["automated_decision"] is False and statement["decision_ground"] is None
    assert view["appeal"]["outcome"] == "overturned" and view["appeal"]["decision"] == "allow"
    with rt.sessions() as db:
        assert current_decision(db, upload_id) == "allow"
    payload = _deliver_last(rt, receiver)
    headers, body = receiver.received[-1]
    assert verify_callback(secret, headers[SIGNATURE_HEADER], body)
    assert payload["event"] == "appeal.decided"
    assert payload["appeal"]["outcome"] == "overturned"
    assert payload["result"]["statement_of_reasons"]["decision"] == "allow"
    assert payload["appeal"]["decided_at"] is not None


def test_what_may_not_be_appealed(
    client: ConsoleClient,
    console_runtime: Runtime,
    make_user: Callable[..., ConsoleUser],
    make_review_item: Callable[..., int],
    receiver: Receiver,
) -> None:
    rt = console_runtime
    item_id = make_review_item()
    token, _secret, upload_id = _platform(rt, item_id, receiver.url)
    stranger, _, _ = _platform(rt, make_review_item(external_id="b.jpg"), receiver.url, "other")
    # Still waiting for a reviewer: nothing final to appeal.
    pending = _appeal(client, token, upload_id, "too early")
    assert pending.status_code == 409 and pending.get_json()["error"]["code"] == "conflict"
    _review(rt, item_id, make_user("reviewer"), "not_a_match")
    # Another client's upload is indistinguishable from a missing one.
    assert _appeal(client, stranger, upload_id, "not mine").status_code == 404
    assert _appeal(client, token, "0" * 32, "missing").status_code == 404
    assert _appeal(client, token, upload_id, "   ").status_code == 400
    assert _appeal(client, token, upload_id, "x" * 2001).status_code == 400
    assert _appeal(client, token, upload_id, "x" * 100_000).status_code == 413
    no_auth = client.post(f"/api/v1/screenings/{upload_id}/appeal", json={"reason": "x"})
    assert no_auth.status_code == 401
    # An allow may be appealed too (the platform thinks it should be blocked), as a form post.
    form = client.post(
        f"/api/v1/screenings/{upload_id}/appeal",
        data={"reason": "this is the banned image"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert form.status_code == 201 and form.get_json()["original_decision"] == "allow"
    with rt.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Appeal)) == 1


def test_auditor_downloads_statements_of_reasons(
    client: ConsoleClient,
    console_runtime: Runtime,
    make_user: Callable[..., ConsoleUser],
    make_review_item: Callable[..., int],
) -> None:
    rt = console_runtime
    item_id = make_review_item()
    _review(rt, item_id, make_user("reviewer"), "confirm")
    client.login(make_user("auditor"))
    csv_download = client.form("/decisions/export", {"fmt": "csv"}, token_from="/audit")
    assert csv_download.status_code == 200
    assert csv_download.headers["Content-Disposition"].startswith("attachment")
    rows = list(csv.DictReader(io.StringIO(csv_download.get_data(as_text=True))))
    assert [(r["source"], r["decision"], r["automated_decision"]) for r in rows] == [
        ("screening", "review", "true"),
        ("review", "block", "false"),
    ]
    assert rows[1]["decision_ground"] == "incompatible_with_terms"
    assert rows[1]["content_type"] == "image" and rows[1]["category"] == "default"
    jsonl = client.form("/decisions/export", {"fmt": "jsonl"}, token_from="/audit")
    records = [json.loads(line) for line in jsonl.get_data(as_text=True).splitlines()]
    assert [r["automated_detection"] for r in records] == [True, True]
    with rt.sessions() as db:
        exports = db.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "decisions.export")
        )
    assert exports == 2


def test_openapi_documents_the_appeal(client: ConsoleClient) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    operation = doc["paths"]["/api/v1/screenings/{id}/appeal"]["post"]
    assert {"201", "400", "401", "404", "409"} <= set(operation["responses"])
    schemas = doc["components"]["schemas"]
    assert {"Appeal", "StatementOfReasons"} <= set(schemas)
    assert set(schemas["StatementOfReasons"]["properties"]) >= {
        "decision_ground",
        "automated_detection",
        "automated_decision",
        "content_type",
        "category",
    }
