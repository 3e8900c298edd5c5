"""The review queue library: ordering, leases, exposure limit, decisions, labelled pairs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from moderation.governance.review import (
    ExposureLimitReached,
    NotClaimedError,
    ReviewError,
    claim_next,
    exposure,
    queue_stats,
    record_reveal,
    release,
)
from moderation.governance.review_decisions import current_decision, decide
from moderation.governance.review_display import item_view
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, LabelledPair, ReviewItem

LEASE = 600
LIMIT = 100


def claim(rt: Runtime, user_id: int, **kw: Any) -> int | None:
    kw.setdefault("lease_seconds", LEASE)
    kw.setdefault("daily_limit", LIMIT)
    with transaction(rt.sessions) as db:
        item = claim_next(db, reviewer_id=user_id, **kw)
        return item.id if item is not None else None


def actions(rt: Runtime) -> list[str]:
    with rt.sessions() as db:
        return list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def set_created(rt: Runtime, item_id: int, when: datetime) -> None:
    with transaction(rt.sessions) as db:
        db.execute(update(ReviewItem).where(ReviewItem.id == item_id).values(created_at=when))


def test_queue_order_is_priority_then_age(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    now = datetime.now(UTC)
    young_low = make_review_item(priority=10)
    old_low = make_review_item(priority=10)
    young_high = make_review_item(priority=90)
    old_high = make_review_item(priority=90)
    for item, age in ((young_low, 1), (old_low, 50), (young_high, 2), (old_high, 40)):
        set_created(rt, item, now - timedelta(minutes=age))
    order = []
    for _ in range(4):
        item = claim(rt, reviewer.id)
        assert item is not None
        order.append(item)
        outcome = decide(rt, item, reviewer_id=reviewer.id, decision="not_a_match")
        assert outcome.final == "allow"
    assert order == [old_high, young_high, old_low, young_low]
    assert claim(rt, reviewer.id) is None


def test_one_item_at_a_time_and_leases_keep_others_out(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    first, second = make_user("reviewer"), make_user("reviewer")
    a, b = make_review_item(), make_review_item()
    got = claim(rt, first.id)
    assert claim(rt, first.id) == got  # the held item again, not a second one
    other = claim(rt, second.id)
    assert {got, other} == {a, b}
    assert claim(rt, make_user("reviewer").id) is None  # both leased
    with rt.sessions() as db:
        stats = queue_stats(db)
    assert (stats.open, stats.claimed, stats.depth) == (0, 2, 2)


def test_expired_lease_returns_the_item_to_the_queue(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    slow, fast = make_user("reviewer"), make_user("reviewer")
    item = make_review_item()
    assert claim(rt, slow.id, lease_seconds=60) == item
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert claim(rt, fast.id, now=later) == item
    with pytest.raises(NotClaimedError):
        decide(rt, item, reviewer_id=slow.id, decision="confirm")
    assert decide(rt, item, reviewer_id=fast.id, decision="confirm").final == "block"


def test_skip_releases_and_excluded_items_are_not_offered(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    a = make_review_item(priority=60)
    b = make_review_item(priority=50)
    assert claim(rt, reviewer.id) == a
    with transaction(rt.sessions) as db:
        assert release(db, a, reviewer.id)
        assert not release(db, a, reviewer.id)
    assert claim(rt, reviewer.id, exclude=[a]) == b
    assert "review.release" in actions(rt)


def test_exposure_limit_stops_claims_and_reveals_are_counted(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    items = [make_review_item() for _ in range(3)]
    for _ in range(2):
        item = claim(rt, reviewer.id, daily_limit=2)
        assert item in items
        with transaction(rt.sessions) as db:
            record_reveal(db, item, reviewer.id)  # type: ignore[arg-type]
        decide(rt, item, reviewer_id=reviewer.id, decision="escalate")  # type: ignore[arg-type]
    with pytest.raises(ExposureLimitReached):
        claim(rt, reviewer.id, daily_limit=2)
    with rt.sessions() as db:
        counts = exposure(db, reviewer.id, limit=2)
    assert (counts.items, counts.reveals, counts.remaining) == (2, 2, 0)
    assert actions(rt).count("review.reveal") == 2
    # A new (UTC) day starts a new count.
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert claim(rt, reviewer.id, daily_limit=2, now=tomorrow) is not None


def test_confirm_writes_labels_audit_and_final_decision(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    item = make_review_item()
    assert claim(rt, reviewer.id) == item
    with rt.sessions() as db:
        view = item_view(db, item, rt.keyring)
        assert view is not None
        assert current_decision(db, view.upload_id) == "review"
    outcome = decide(rt, item, reviewer_id=reviewer.id, decision="confirm", notes="clear copy")
    assert (outcome.decision, outcome.final, outcome.labelled_pairs) == ("confirm", "block", 1)
    with rt.sessions() as db:
        pairs = db.scalars(select(LabelledPair).where(LabelledPair.source == "review")).all()
        assert len(pairs) == 1
        pair = pairs[0]
        assert (pair.upload_id, pair.is_copy, pair.source, pair.created_by) == (
            view.upload_id,
            True,
            "review",
            reviewer.id,
        )
        assert pair.entry_id is not None
        assert pair.features == {"cosine": 0.72, "pdq_similarity": 0.84}
        row = db.get(ReviewItem, item)
        assert row is not None
        assert (row.state, row.decision, row.decided_by, row.notes) == (
            "decided",
            "confirm",
            reviewer.id,
            "clear copy",
        )
        assert row.claimed_by is None
        assert current_decision(db, view.upload_id) == "block"
        event = db.scalars(select(AuditEvent).where(AuditEvent.action == "review.decide")).one()
        assert event.actor == f"user:{reviewer.id}"
        assert event.details["final"] == "block"
        assert event.details["upload_id"] == view.upload_id
    with pytest.raises(NotClaimedError):
        decide(rt, item, reviewer_id=reviewer.id, decision="not_a_match")


def test_escalation_goes_to_admins_without_a_label(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer, admin = make_user("reviewer"), make_user("admin")
    item = make_review_item()
    assert claim(rt, reviewer.id) == item
    outcome = decide(rt, item, reviewer_id=reviewer.id, decision="escalate")
    assert outcome.final is None and outcome.labelled_pairs == 0
    assert claim(rt, make_user("reviewer").id) is None  # not in the main queue any more
    with pytest.raises(ReviewError, match="admins"):
        claim(rt, reviewer.id, queue="escalated")
    assert claim(rt, admin.id, queue="escalated") == item
    with pytest.raises(ReviewError, match="already escalated"):
        decide(rt, item, reviewer_id=admin.id, decision="escalate")
    final = decide(rt, item, reviewer_id=admin.id, decision="not_a_match")
    assert final.final == "allow" and final.labelled_pairs == 1
    with rt.sessions() as db:
        pair = db.scalars(select(LabelledPair).where(LabelledPair.source == "review")).one()
        assert pair.is_copy is False and pair.created_by == admin.id
        assert db.get(ReviewItem, item).state == "decided"  # type: ignore[union-attr]


def test_bad_decision_and_unknown_item(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    item = make_review_item()
    claim(rt, reviewer.id)
    with pytest.raises(ReviewError, match="decision must be"):
        decide(rt, item, reviewer_id=reviewer.id, decision="block")
    with pytest.raises(ReviewError, match="no review item"):
        decide(rt, 999_999, reviewer_id=reviewer.id, decision="confirm")
    with pytest.raises(ReviewError, match="unknown queue"):
        claim(rt, reviewer.id, queue="other")


def test_concurrent_claims_on_sqlite_never_share_an_item(
    console_runtime: Runtime,
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
    race: Callable[..., dict[int, int | None]],
) -> None:
    rt = console_runtime
    reviewers = [make_user("reviewer") for _ in range(6)]
    items = {make_review_item() for _ in range(4)}
    got = race(lambda user_id: claim(rt, user_id), [r.id for r in reviewers])
    claimed = [i for i in got.values() if i is not None]
    assert len(claimed) == len(set(claimed)) == len(items)
    assert set(claimed) == items
    assert sum(1 for i in got.values() if i is None) == len(reviewers) - len(items)


def test_a_decision_is_queued_for_the_platforms_callback(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    from moderation.service.api_clients import create_api_client
    from moderation.storage.models import CallbackDelivery, Upload

    rt = console_runtime
    reviewer = make_user("reviewer")
    with_callback, without = make_review_item(), make_review_item()
    with transaction(rt.sessions) as db:
        client = create_api_client(
            db, rt.keyring, "acme", callback_allowlist=["https://hooks.example.com/cb"]
        )
        item = db.get(ReviewItem, with_callback)
        assert item is not None
        upload = db.get(Upload, item.upload_id)
        assert upload is not None
        upload.client_id = client.client_id
        upload.callback_url = "https://hooks.example.com/cb"
    for item_id, decision in ((with_callback, "confirm"), (without, "not_a_match")):
        assert claim(rt, reviewer.id) == item_id
        assert decide(rt, item_id, reviewer_id=reviewer.id, decision=decision).notified
    with rt.sessions() as db:
        deliveries = db.scalars(select(CallbackDelivery)).all()
    assert len(deliveries) == 1  # only the upload with a callback URL
    payload = deliveries[0].payload
    assert payload["event"] == "review.decided"
    assert payload["review"]["decision"] == "confirm"
    assert deliveries[0].url == "https://hooks.example.com/cb"
