"""Allow proposals: the two-person rule for allow banks.

An allow-bank entry suppresses every block-bank match at least as strong as it (allow wins
ties), so one person must not be able to whitelist an image. A reviewer's "not a match" with an
allow bank therefore only files a proposal
(:func:`moderation.governance.approvals.propose_allow`, an :class:`Approval` of action
:data:`~moderation.governance.approvals.ADD_ALLOW`); :func:`approve_allow`, by a different
active reviewer or admin, adds the upload's image to the bank and publishes the snapshot that
makes it suppress anything. Rejecting is :func:`moderation.governance.approvals.reject`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.operations import commit_with_snapshot
from moderation.banks.records import BlocklistError
from moderation.banks.snapshot_payload import EntrySignals
from moderation.governance.approvals import (
    ADD_ALLOW,
    ApprovalError,
    checked_pending,
    list_approvals,
    locked_pending,
    mark_approved,
)
from moderation.governance.review import ReviewError
from moderation.governance.review_decisions import add_entry, prepare_bank_entry
from moderation.storage.console import Approval
from moderation.storage.models import Bank, Match, ReviewItem, Screening

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllowApproval:
    """What approving a proposal did."""

    approval_id: int
    bank: str
    upload_id: str
    entry_id: str | None  # None when the bank already held the upload's bytes
    snapshot_version: int


@dataclass(frozen=True)
class AllowProposalView:
    """A pending proposal as reviewers see it: what would be allowed, and why."""

    approval_id: int
    bank: str
    upload_id: str
    review_item_id: int | None
    requested_by: int
    requester_email: str
    created_at: datetime
    notes: str | None
    matches: list[dict[str, Any]]  # {"entry_id": "e_<n>", "bank", "cosine", "pdq_distance"}


def _bank_name(runtime: Runtime, bank_id: int) -> str:
    with runtime.sessions() as session:
        bank = session.get(Bank, bank_id)
        if bank is None:
            raise ApprovalError(f"bank {bank_id} is gone: reject the proposal")
        return bank.name


def approve_allow(
    runtime: Runtime, approval_id: int, *, approver_id: int, origin: str | None = None
) -> AllowApproval:
    """Approve a pending allow proposal: the upload's image joins the allow bank, and the new
    snapshot version is written, in one transaction (audited ``approval.approve`` and
    ``entry.add_upload``, actor the approver).

    Raises:
        ApprovalError: no such pending allow proposal; the approver filed it (the attempt is
            audited, outcome ``denied``) or is not an active reviewer or admin; the bank is gone;
            the upload's image is gone (erased) or no longer decodes.
    """
    action, params = checked_pending(runtime, approval_id, approver_id, origin=origin)
    if action != ADD_ALLOW:
        raise ApprovalError(f"approval request {approval_id} is not an allow proposal ({action})")
    upload_id = str(params["upload_id"])
    bank = _bank_name(runtime, int(params["bank_id"]))
    try:
        prepared = prepare_bank_entry(runtime, upload_id, bank, "not_a_match")
    except (ReviewError, BlocklistError) as exc:
        raise ApprovalError(str(exc)) from exc
    added: list[str | None] = []

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        approval = locked_pending(session, approval_id, approver_id)
        entry, signal = add_entry(session, prepared, actor=f"user:{approver_id}")
        mark_approved(session, approval, approver_id, origin)
        added.append(entry.public_id if entry is not None else None)
        return ([signal] if signal is not None else []), ()

    version = commit_with_snapshot(runtime, change)
    logger.info("allow proposal %d approved: upload %s in bank %s", approval_id, upload_id, bank)
    return AllowApproval(approval_id, bank, upload_id, added[0], version)


def _matches(session: Session, upload_id: str) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Match.entry_id, Bank.name, Match.cosine, Match.pdq_distance)
        .join(Screening, Match.screening_id == Screening.id)
        .outerjoin(Bank, Match.bank_id == Bank.id)
        .where(Screening.upload_id == upload_id)
        .order_by(Match.id)
    ).all()
    return [
        {
            "entry_id": None if entry_id is None else f"e_{entry_id}",
            "bank": bank,
            "cosine": None if cosine is None else round(cosine, 4),
            "pdq_distance": pdq,
        }
        for entry_id, bank, cosine, pdq in rows
    ]


def pending_allow_proposals(session: Session) -> list[AllowProposalView]:
    """Pending allow proposals, newest first (at most 200), with the block-bank matches the
    allow entry would overrule and the proposer's review notes."""
    views = []
    for approval in list_approvals(session, state="pending", actions=(ADD_ALLOW,)):
        params = approval.params
        item_id = params.get("review_item_id")
        item = session.get(ReviewItem, int(item_id)) if item_id is not None else None
        views.append(
            AllowProposalView(
                approval_id=approval.approval_id,
                bank=str(params.get("bank")),
                upload_id=str(params.get("upload_id")),
                review_item_id=None if item_id is None else int(item_id),
                requested_by=approval.requested_by,
                requester_email=approval.requester_email,
                created_at=approval.created_at,
                notes=item.notes if item is not None else None,
                matches=_matches(session, str(params.get("upload_id"))),
            )
        )
    return views


def pending_proposal_upload(session: Session, approval_id: int) -> str | None:
    """The upload id of pending allow proposal ``approval_id``, or None (no such pending
    proposal): the console shows its preview to the reviewers who may decide it."""
    approval = session.get(Approval, approval_id)
    if approval is None or approval.action != ADD_ALLOW or approval.state != "pending":
        return None
    return str(approval.params.get("upload_id"))
