"""The two-person rule: removing entries from a bank (or a whole bank) needs a second admin.

One admin files a request (:func:`request_removal`, audited ``approval.request``); a different,
active admin approves it (:func:`approve`), which runs the removal, the new snapshot version, the
approval's state change and its audit events in one transaction, or rejects it
(:func:`reject`). Nothing is removed on a request alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.operations import commit_with_snapshot
from moderation.banks.snapshot_payload import EntrySignals
from moderation.storage.console import Approval
from moderation.storage.models import Bank, Entry, User

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

DELETE_ENTRIES = "entries.delete"
DELETE_BANK = "bank.delete"
ACTIONS: tuple[str, ...] = (DELETE_ENTRIES, DELETE_BANK)
APPROVER_ROLE = "admin"


class ApprovalError(Exception):
    """A request or decision was refused (self-approval, not pending, not an admin...)."""


@dataclass(frozen=True)
class ApprovalView:
    """A request as the console lists it."""

    approval_id: int
    action: str
    params: dict[str, Any]
    requested_by: int
    requester_email: str
    approved_by: int | None
    state: str
    created_at: datetime
    decided_at: datetime | None


def _admin(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.disabled or user.role != APPROVER_ROLE:
        raise ApprovalError("only an active admin may request or decide removals")
    return user


def request_removal(
    session: Session,
    *,
    action: str,
    bank_id: int,
    entry_ids: Sequence[int] = (),
    requested_by: int,
    origin: str | None = None,
) -> Approval:
    """File a pending removal request; audited ``approval.request``.

    Args:
        action: :data:`DELETE_ENTRIES` (``entry_ids`` of bank ``bank_id``) or :data:`DELETE_BANK`.

    Raises:
        ApprovalError: unknown action or bank, no entries named, an entry of another bank, or
            the requester is not an active admin.
    """
    _admin(session, requested_by)
    if action not in ACTIONS:
        raise ApprovalError(f"unknown action {action!r}")
    bank = session.get(Bank, bank_id)
    if bank is None:
        raise ApprovalError(f"no bank {bank_id}")
    params: dict[str, Any] = {"bank_id": bank.id, "bank": bank.name}
    if action == DELETE_ENTRIES:
        ids = sorted(set(int(e) for e in entry_ids))
        if not ids:
            raise ApprovalError("name at least one entry to remove")
        found = set(
            session.scalars(select(Entry.id).where(Entry.id.in_(ids), Entry.bank_id == bank.id))
        )
        if found != set(ids):
            raise ApprovalError("some entries are not in this bank")
        params["entry_ids"] = ids
    approval = Approval(action=action, params=params, requested_by=requested_by, state="pending")
    session.add(approval)
    session.flush()
    record_event(
        session,
        actor=f"user:{requested_by}",
        action="approval.request",
        target=f"approval:{approval.id}",
        origin=origin,
        details={"action": action, **params, "entry_ids": params.get("entry_ids", [])[:100]},
    )
    return approval


def _locked_pending(session: Session, approval_id: int, admin_id: int) -> Approval:
    """The pending request, locked, once ``admin_id`` is checked to be an active admin."""
    _admin(session, admin_id)
    approval = session.get(Approval, approval_id, with_for_update=True)
    if approval is None:
        raise ApprovalError(f"no approval request {approval_id}")
    if approval.state != "pending":
        raise ApprovalError(f"approval request {approval_id} is already {approval.state}")
    return approval


def _pending(session: Session, approval_id: int, approver_id: int) -> Approval:
    approval = _locked_pending(session, approval_id, approver_id)
    if approval.requested_by == approver_id:
        raise ApprovalError("a second admin must approve: you filed this request")
    return approval


def approve(
    runtime: Runtime, approval_id: int, *, approver_id: int, origin: str | None = None
) -> int:
    """Approve and carry out a pending request; returns the new snapshot version.

    Raises:
        ApprovalError: not pending, self-approval, or the approver is not an active admin.
    """
    now = datetime.now(UTC)

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        approval = _pending(session, approval_id, approver_id)
        params = dict(approval.params)
        actor = f"user:{approver_id}"
        if approval.action == DELETE_ENTRIES:
            ids = [int(e) for e in params.get("entry_ids", [])]
            entries = session.scalars(
                select(Entry).where(Entry.id.in_(ids), Entry.bank_id == int(params["bank_id"]))
            ).all()
        else:
            entries = session.scalars(
                select(Entry).where(Entry.bank_id == int(params["bank_id"]))
            ).all()
        removed = [e.id for e in entries]
        for entry in entries:
            session.delete(entry)
        session.flush()
        if approval.action == DELETE_BANK:
            bank = session.get(Bank, int(params["bank_id"]))
            if bank is not None:
                session.delete(bank)
        approval.state, approval.approved_by, approval.decided_at = "approved", approver_id, now
        record_event(
            session,
            actor=actor,
            action="approval.approve",
            target=f"approval:{approval.id}",
            origin=origin,
            details={"action": approval.action, "requested_by": approval.requested_by},
        )
        record_event(
            session,
            actor=actor,
            action=approval.action,
            target=f"bank:{params['bank_id']}",
            origin=origin,
            details={"approval_id": approval.id, "count": len(removed), "entry_ids": removed[:100]},
        )
        return (), removed

    return commit_with_snapshot(runtime, change)


def reject(
    session: Session, approval_id: int, *, approver_id: int, origin: str | None = None
) -> Approval:
    """Reject a pending request (audited ``approval.reject``); nothing is removed.

    The requester may withdraw their own request this way.

    Raises:
        ApprovalError: not pending, or the rejecter is not an active admin.
    """
    approval = _locked_pending(session, approval_id, approver_id)
    approval.state, approval.approved_by, approval.decided_at = (
        "rejected",
        approver_id,
        datetime.now(UTC),
    )
    record_event(
        session,
        actor=f"user:{approver_id}",
        action="approval.reject",
        target=f"approval:{approval.id}",
        origin=origin,
        details={"action": approval.action},
    )
    return approval


def list_approvals(session: Session, *, state: str | None = "pending") -> list[ApprovalView]:
    """Requests (newest first), by state (None: all)."""
    query = select(Approval, User.email).join(User, Approval.requested_by == User.id)
    if state is not None:
        query = query.where(Approval.state == state)
    return [
        ApprovalView(
            approval_id=a.id,
            action=a.action,
            params=dict(a.params),
            requested_by=a.requested_by,
            requester_email=email,
            approved_by=a.approved_by,
            state=a.state,
            created_at=a.created_at,
            decided_at=a.decided_at,
        )
        for a, email in session.execute(query.order_by(Approval.id.desc()).limit(200)).all()
    ]
