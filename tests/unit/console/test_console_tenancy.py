"""Tenant isolation in the console: a bank's owner and sharing on its page, and the review
queue filtered per API client, with reviewers scoped to one client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from moderation.banks.records import create_bank
from moderation.banks.tenancy import sharing_of
from moderation.governance.tenancy import set_reviewer_client
from moderation.service.api_clients import create_api_client
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Bank, ReviewItem


def _clients(rt: Runtime, *names: str) -> list[int]:
    with transaction(rt.sessions) as db:
        return [create_api_client(db, rt.keyring, name).client_id for name in names]


def test_admin_shares_and_reowns_a_bank_audited(
    client: Any, console_runtime: Runtime, make_user: Callable[..., Any]
) -> None:
    rt = console_runtime
    _clients(rt, "platform-a", "platform-b")
    with transaction(rt.sessions) as db:
        bid = create_bank(db, "lists").id
    client.login(make_user("admin"))
    page = f"/banks/{bid}"
    assert "Owner and sharing" in client.get(page).get_data(as_text=True)
    steps = [
        {"action": "owner", "client": "platform-a"},
        {"action": "unshare", "client": ""},
        {"action": "share", "client": "platform-b"},
    ]
    for step in steps:
        assert client.form(f"{page}/sharing", step, token_from=page).status_code == 302
    with rt.sessions() as db:
        bank = db.get(Bank, bid)
        assert bank is not None
        assert sharing_of(db, bank) == {
            "owner": "platform-a",
            "shared_with_all": False,
            "shared_with": ["platform-b"],
        }
        audited = db.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.target == f"bank:{bid}")
            .order_by(AuditEvent.seq)
        ).all()
    assert audited == ["bank.set_owner", "bank.unshare", "bank.share"]
    unknown = client.form(
        f"{page}/sharing", {"action": "share", "client": "nobody"}, token_from=page
    )
    assert unknown.status_code == 302
    assert "no API client" in client.get(page).get_data(as_text=True)


def test_queue_filters_by_client_and_scoped_reviewer_claims_only_theirs(
    client: Any,
    console_runtime: Runtime,
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
) -> None:
    rt = console_runtime
    a_id, b_id = _clients(rt, "platform-a", "platform-b")
    items = {cid: make_review_item(external_id=f"{cid}.jpg") for cid in (a_id, b_id)}
    with transaction(rt.sessions) as db:
        for cid, item_id in items.items():
            db.execute(update(ReviewItem).where(ReviewItem.id == item_id).values(client_id=cid))
    reviewer = make_user("reviewer")
    client.login(reviewer)
    everything = client.get("/review").get_data(as_text=True)
    assert 'id="queue-open">2<' in everything and "platform-a" in everything
    assert 'id="queue-open">1<' in client.get(f"/review?client={b_id}").get_data(as_text=True)
    claimed = client.form(
        "/review/claim", {"queue": "main", "client": str(b_id)}, token_from="/review"
    )
    assert claimed.headers["Location"] == f"/review/{items[b_id]}"
    with transaction(rt.sessions) as db:
        db.execute(update(ReviewItem).values(state="open", claimed_by=None, lease_until=None))
        set_reviewer_client(db, reviewer.email, "platform-a", actor="test")
    # Scoped to A: B's figures are not theirs to see, and claims take A's item only.
    assert client.get(f"/review?client={b_id}").status_code == 404
    assert 'id="queue-open">1<' in client.get("/review").get_data(as_text=True)
    again = client.form("/review/claim", {"queue": "main"}, token_from="/review")
    assert again.headers["Location"] == f"/review/{items[a_id]}"
