"""Review items from real screenings (real encoder, real encrypted bank), decided end to end:
confirm adds the upload to a block bank, not-a-match proposes it for an allow bank (a second
reviewer or an admin approves), and the next screening of the same image follows the
reviewers' decisions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.governance.allow_proposals import approve_allow, pending_allow_proposals
from moderation.governance.approvals import ApprovalError, reject
from moderation.governance.review import ReviewError, claim_next, release
from moderation.governance.review_decisions import decide
from moderation.governance.review_display import item_view
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.storage.console import Approval
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Entry, LabelledPair, Screening, Upload
from tests.conftest import skimage_photo_path

BANNED = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture
def screened(console_runtime: Runtime, review_band_copies: dict[str, Path]) -> dict[str, Path]:
    """A block bank of four photos and an allow bank; three edited copies screened to review."""
    rt = console_runtime
    with transaction(rt.sessions) as db:
        create_bank(db, "known")
        create_bank(db, "benign", kind="allow")
    import_bank(rt, "known", [skimage_photo_path(n) for n in BANNED], actor="test")
    results: list[dict[str, Any]] = []
    screen_paths(rt, list(review_band_copies.values()), on_result=results.append)
    for result in results:
        assert result["decision"] == "review", result  # the policy's review band moved?
    return review_band_copies


def test_reviewers_settle_real_screenings(
    console_runtime: Runtime, make_user: Callable[..., Any], screened: dict[str, Path]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    settings = rt.settings
    claimed: list[int] = []
    for _ in range(3):
        with transaction(rt.sessions) as db:
            item = claim_next(
                db,
                reviewer_id=reviewer.id,
                lease_seconds=settings.review_lease_seconds,
                daily_limit=settings.review_daily_exposure_limit,
                exclude=claimed,
            )
            assert item is not None
            claimed.append(item.id)
        # Skip it, so the next claim gives another item (a reviewer holds one at a time).
        with transaction(rt.sessions) as db:
            assert release(db, item.id, reviewer.id)
    by_name: dict[str, int] = {}
    with rt.sessions() as db:
        for item_id in claimed:
            view = item_view(db, item_id, rt.keyring)
            assert view is not None and view.matches
            assert view.matches[0].bank == "known" and view.matches[0].cosine is not None
            assert "cosine" in view.matches[0].signals
            name = Path(view.external_id or "").stem.replace("-edited", "")
            by_name[name] = item_id
    assert set(by_name) == set(screened)

    def take(item_id: int) -> None:
        with transaction(rt.sessions) as db:
            got = claim_next(
                db,
                reviewer_id=reviewer.id,
                lease_seconds=60,
                daily_limit=100,
                exclude=[i for i in claimed if i != item_id],
            )
            assert got is not None and got.id == item_id

    # A block bank is the wrong kind for "not a match".
    take(by_name["astronaut"])
    with pytest.raises(ReviewError, match="allow banks"):
        decide(
            rt,
            by_name["astronaut"],
            reviewer_id=reviewer.id,
            decision="not_a_match",
            bank_name="known",
        )
    confirmed = decide(
        rt, by_name["astronaut"], reviewer_id=reviewer.id, decision="confirm", bank_name="known"
    )
    assert confirmed.entry_id is not None and confirmed.snapshot_version is not None

    take(by_name["coffee"])
    allowed = decide(
        rt, by_name["coffee"], reviewer_id=reviewer.id, decision="not_a_match", bank_name="benign"
    )
    # One reviewer's "not a match" only proposes the allow-bank addition.
    assert allowed.final == "allow" and allowed.entry_id is None
    assert allowed.proposal_id is not None

    take(by_name["rocket"])
    assert decide(rt, by_name["rocket"], reviewer_id=reviewer.id, decision="escalate").final is None

    with rt.sessions() as db:
        added = {
            e.upload_id: e for e in db.scalars(select(Entry).where(Entry.upload_id.is_not(None)))
        }
        assert set(added) == {confirmed.upload_id}
        assert added[confirmed.upload_id].bank.name == "known"
        reviewed = select(LabelledPair).where(LabelledPair.source == "review")
        pairs = db.scalars(reviewed.order_by(LabelledPair.id)).all()
        assert [(p.upload_id, p.is_copy) for p in pairs] == [
            (confirmed.upload_id, True),
            (allowed.upload_id, False),
        ]
        # Features come from the screening's explanation (empty without a classifier stage).
        for pair in pairs:
            screening = db.scalar(select(Screening).where(Screening.upload_id == pair.upload_id))
            assert screening is not None
            candidate = next(
                c
                for c in screening.explanation["candidates"]
                if c["entry_id"] == f"e_{pair.entry_id}"
            )
            assert pair.features == candidate["features"]
        uploads = {u.id: u.external_id for u in db.scalars(select(Upload))}

    # The same images screened again: block (the confirmed entry), and still review (the allow
    # proposal waits for a second person).
    again = _screen_again(rt, [screened["astronaut"], screened["coffee"]])
    assert again["astronaut-edited"]["decision"] == "block"
    assert again["astronaut-edited"]["matches"][0]["entry_id"] == confirmed.entry_id
    assert again["coffee-edited"]["decision"] == "review"
    assert uploads[confirmed.upload_id] == str(screened["astronaut"])


def _screen_again(rt: Runtime, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Screen ``paths`` again; their results by file stem."""
    results: dict[str, dict[str, Any]] = {}
    screen_paths(rt, paths, on_result=lambda r: results.__setitem__(Path(r["path"]).stem, r))
    return results


def _take_and_decide(rt: Runtime, reviewer_id: int, **decision: Any) -> Any:
    """Claim the next item and settle it with ``decision`` (keyword arguments of decide)."""
    with transaction(rt.sessions) as db:
        item = claim_next(db, reviewer_id=reviewer_id, lease_seconds=60, daily_limit=100)
        assert item is not None
        item_id = item.id
    return decide(rt, item_id, reviewer_id=reviewer_id, **decision)


def test_allow_bank_addition_needs_a_second_person(
    console_runtime: Runtime, make_user: Callable[..., Any], screened: dict[str, Path]
) -> None:
    rt = console_runtime
    first, second, admin = make_user("reviewer"), make_user("reviewer"), make_user("admin")
    proposed = _take_and_decide(rt, first.id, decision="not_a_match", bank_name="benign")
    assert proposed.final == "allow" and proposed.entry_id is None
    proposal_id = proposed.proposal_id
    with rt.sessions() as db:
        upload = db.get(Upload, proposed.upload_id)
        assert upload is not None and upload.external_id is not None
        path = Path(upload.external_id)
        assert db.scalar(select(Entry.id).where(Entry.upload_id == upload.id)) is None
        pending = pending_allow_proposals(db)
        assert [(p.approval_id, p.bank, p.upload_id) for p in pending] == [
            (proposal_id, "benign", upload.id)
        ]
        assert pending[0].matches and pending[0].matches[0]["bank"] == "known"
    # Re-uploaded, the image is still sent to review: the proposal suppresses nothing.
    assert _screen_again(rt, [path])[path.stem]["decision"] == "review"

    # The proposer cannot approve their own proposal; the attempt is audited.
    with pytest.raises(ApprovalError, match="second reviewer or an admin"):
        approve_allow(rt, proposal_id, approver_id=first.id)
    with rt.sessions() as db:
        denied = db.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "approval.approve", AuditEvent.outcome == "denied"
            )
        ).one()
        assert (denied.actor, denied.target) == (f"user:{first.id}", f"approval:{proposal_id}")
        assert db.scalar(select(Entry.id).where(Entry.upload_id == upload.id)) is None
    assert _screen_again(rt, [path])[path.stem]["decision"] == "review"

    # A second reviewer approves: the image joins the allow bank and now suppresses the match.
    approved = approve_allow(rt, proposal_id, approver_id=second.id)
    assert approved.entry_id is not None and approved.bank == "benign"
    again = _screen_again(rt, [path])[path.stem]
    assert (again["decision"], again["reason"]) == ("allow", "allow_bank")
    with rt.sessions() as db:
        row = db.get(Approval, proposal_id)
        assert row is not None and (row.state, row.approved_by) == ("approved", second.id)
        entry = db.scalars(select(Entry).where(Entry.upload_id == upload.id)).one()
        assert entry.bank.name == "benign" and entry.added_by == f"user:{second.id}"
        assert pending_allow_proposals(db) == []
    with pytest.raises(ApprovalError, match="already approved"):
        approve_allow(rt, proposal_id, approver_id=admin.id)


def test_allow_proposal_rejected_adds_nothing(
    console_runtime: Runtime, make_user: Callable[..., Any], screened: dict[str, Path]
) -> None:
    rt = console_runtime
    first, admin, auditor = make_user("reviewer"), make_user("admin"), make_user("auditor")
    proposed = _take_and_decide(rt, first.id, decision="not_a_match", bank_name="benign")
    # Only active reviewers and admins decide proposals.
    with pytest.raises(ApprovalError, match="only an active admin or an active reviewer"):
        approve_allow(rt, proposed.proposal_id, approver_id=auditor.id)
    with transaction(rt.sessions) as db:
        reject(db, proposed.proposal_id, approver_id=admin.id)
    with pytest.raises(ApprovalError, match="already rejected"):
        approve_allow(rt, proposed.proposal_id, approver_id=admin.id)
    with rt.sessions() as db:
        assert db.scalar(select(Entry.id).where(Entry.upload_id == proposed.upload_id)) is None
        actions = list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))
    assert actions[-1] == "approval.reject"
    assert actions.index("approval.request") < actions.index("review.decide")
