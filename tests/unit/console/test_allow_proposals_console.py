"""The two-person rule for allow banks in the console: a reviewer's "not a match" with an allow
bank becomes a proposal listed for the other reviewers and admins, who approve or reject it; the
proposer cannot approve it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from moderation.banks.records import create_bank
from moderation.governance.review import claim_next
from moderation.governance.review_decisions import decide
from moderation.service.runtime import Runtime
from moderation.storage.console import Approval
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Entry, ReviewItem

PAGE = "/review/allow-proposals"


def _propose(client: Any, rt: Runtime, make_review_item: Callable[..., int]) -> int:
    """One review item settled "not a match" with allow bank ``benign``; the proposal's id."""
    with transaction(rt.sessions) as db:
        create_bank(db, "benign", kind="allow")
    item = make_review_item()
    client.form("/review/claim", {"queue": "main"}, token_from="/review")
    done = client.form(
        f"/review/{item}/act",
        {"action": "not_a_match", "bank": "benign"},
        token_from=f"/review/{item}",
    )
    assert done.status_code == 302
    with rt.sessions() as db:
        assert db.get(ReviewItem, item).decision == "not_a_match"  # type: ignore[union-attr]
        approval = db.scalars(select(Approval)).one()
        assert (approval.action, approval.state) == ("allow.add", "pending")
        assert approval.params["review_item_id"] == item
        assert db.scalar(select(Entry.id).where(Entry.upload_id.is_not(None))) is None
        return approval.id


def _verdict(client: Any, approval_id: int, verdict: str) -> Any:
    return client.form(f"{PAGE}/{approval_id}", {"verdict": verdict}, token_from=PAGE)


@pytest.fixture
def proposed(
    client: Any,
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
    console_runtime: Runtime,
) -> tuple[Any, int]:
    """A reviewer signed in on ``client`` who proposed an item's upload for allow bank
    ``benign``: (the reviewer, the proposal's id)."""
    first = make_user("reviewer")
    client.login(first)
    return first, _propose(client, console_runtime, make_review_item)


def test_console_allow_proposal_needs_another_reviewer(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
    proposed: tuple[Any, int],
) -> None:
    rt = console_runtime
    _first, proposal = proposed
    second = make_user("reviewer")
    own = client.get(PAGE).get_data(as_text=True)
    assert "waiting for another reviewer or an admin" in own and "Withdraw" in own
    preview = client.get(f"{PAGE}/{proposal}/image")
    assert (preview.status_code, preview.mimetype) == (200, "image/jpeg")

    # The proposer's approval is refused (and audited); nothing joins the bank.
    refused = _verdict(client, proposal, "approve")
    assert refused.headers["Location"] == PAGE
    assert "must approve: you filed this request" in client.get(PAGE).get_data(as_text=True)
    with rt.sessions() as db:
        assert db.get(Approval, proposal).state == "pending"  # type: ignore[union-attr]
        assert db.scalar(select(Entry.id).where(Entry.upload_id.is_not(None))) is None
        outcomes = list(
            db.scalars(
                select(AuditEvent.outcome).where(
                    AuditEvent.action == "approval.approve",
                    AuditEvent.target == f"approval:{proposal}",
                )
            )
        )
        assert outcomes == ["denied"]

    other = new_client()
    other.login(second)
    page = other.get(PAGE).get_data(as_text=True)
    assert 'value="approve"' in page and "known" in page  # the match it would overrule
    assert _verdict(other, proposal, "approve").headers["Location"] == PAGE
    with rt.sessions() as db:
        row = db.get(Approval, proposal)
        assert row is not None and (row.state, row.approved_by) == ("approved", second.id)
        entry = db.scalars(select(Entry).where(Entry.upload_id.is_not(None))).one()
        assert entry.bank.name == "benign"
    assert "Nothing waiting." in other.get(PAGE).get_data(as_text=True)
    assert other.get(f"{PAGE}/{proposal}/image").status_code == 404


def test_console_allow_proposal_rejected_by_an_admin(
    proposed: tuple[Any, int],
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    console_runtime: Runtime,
) -> None:
    proposal = proposed[1]
    admin = new_client()
    admin.login(make_user("admin"))
    assert _verdict(admin, proposal, "reject").status_code == 302
    with console_runtime.sessions() as db:
        assert db.get(Approval, proposal).state == "rejected"  # type: ignore[union-attr]
        assert db.scalar(select(Entry.id).where(Entry.upload_id.is_not(None))) is None
    # Allow proposals are not removal requests: the banks' approval page does not list them.
    assert f"<td>{proposal}</td>" not in admin.get("/banks/approvals").get_data(as_text=True)


def _decide_not_a_match(rt: Runtime, reviewer_id: int, item: int) -> int:
    """``item`` claimed and settled "not a match" with allow bank ``benign``; the proposal id."""
    with transaction(rt.sessions) as db:
        claimed = claim_next(db, reviewer_id=reviewer_id, lease_seconds=60, daily_limit=100)
        assert claimed is not None and claimed.id == item
    outcome = decide(rt, item, reviewer_id=reviewer_id, decision="not_a_match", bank_name="benign")
    assert outcome.proposal_id is not None
    return outcome.proposal_id


def test_cli_lists_approves_and_rejects_allow_proposals(
    runner: Any,
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
    console_runtime: Runtime,
) -> None:
    rt = console_runtime
    first, second = make_user("reviewer"), make_user("reviewer")
    with transaction(rt.sessions) as db:
        create_bank(db, "benign", kind="allow")
    kept = _decide_not_a_match(rt, first.id, make_review_item())
    dropped = _decide_not_a_match(rt, first.id, make_review_item())
    output = runner.invoke(["review", "allow-proposals", "--json"]).output
    listed = [(row["approval_id"], row["bank"]) for row in map(json.loads, output.splitlines())]
    assert listed == [(dropped, "benign"), (kept, "benign")]

    own = runner.invoke(["review", "approve-allow", str(kept), "--as", first.email])
    assert own.exit_code == 1 and "you filed this request" in own.output
    done = runner.invoke(["review", "approve-allow", str(kept), "--as", second.email])
    assert done.exit_code == 0, done.output
    approved = json.loads(done.output)
    assert approved["approval_id"] == kept and approved["entry_id"] is not None
    rejected = runner.invoke(["review", "reject-allow", str(dropped), "--as", second.email])
    assert json.loads(rejected.output) == {"approval_id": dropped, "state": "rejected"}
    with rt.sessions() as db:
        states = {i: state for i, state in db.execute(select(Approval.id, Approval.state))}
        assert states == {kept: "approved", dropped: "rejected"}
        added = db.scalars(select(Entry).where(Entry.upload_id.is_not(None))).all()
        assert [e.public_id for e in added] == [approved["entry_id"]]
    assert runner.invoke(["review", "allow-proposals", "--json"]).output == ""
