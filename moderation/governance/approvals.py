"""The two-person rule: removing entries from a bank (or a whole bank) needs a second admin, and
adding a reviewed upload to an allow bank needs a second reviewer or an admin.

One admin files a removal request (:func:`request_removal`, audited ``approval.request``); a
different, active admin approves it (:func:`approve`), which runs the removal, the new snapshot
version, the approval's state change and its audit events in one transaction, or rejects it
(:func:`reject`). Nothing is removed on a request alone.

A reviewer's "not a match" with an allow bank files an allow proposal (:func:`propose_allow`,
action :data:`ADD_ALLOW`); nothing is added to the bank, so nothing is suppressed, until a
different active reviewer or admin approves it
(:func:`moderation.governance.allow_proposals.approve_allow`). Either role may reject it.
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
from moderation.storage.db import transaction
from moderation.storage.models import Bank, Entry, User

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

DELETE_ENTRIES = "entries.delete"
DELETE_BANK = "bank.delete"
ACTIONS: tuple[str, ...] = (DELETE_ENTRIES, DELETE_BANK)
"""The removal requests (:func:`request_removal`, carried out by :func:`approve`)."""
ADD_ALLOW = "allow.add"
"""An allow proposal: add a reviewed upload's image to an allow bank."""
APPROVER_ROLE = "admin"
APPROVER_ROLES: dict[str, frozenset[str]] = {
    DELETE_ENTRIES: frozenset({APPROVER_ROLE}),
    DELETE_BANK: frozenset({APPROVER_ROLE}),
    ADD_ALLOW: frozenset({"admin", "reviewer"}),
}
"""Action -> roles that may file, approve or reject it."""


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


def _entitled(session: Session, user_id: int, action: str) -> User:
    """The user, once checked to be active with a role that may request or decide ``action``."""
    user = session.get(User, user_id)
    roles = APPROVER_ROLES.get(action, frozenset())
    if user is None or user.disabled or user.role not in roles:
        who = " or ".join(f"an active {r}" for r in sorted(roles)) or "nobody"
        raise ApprovalError(f"only {who} may request or decide {action}")
    return user


def _file(
    session: Session,
    *,
    action: str,
    params: dict[str, Any],
    requested_by: int,
    origin: str | None,
    details: dict[str, Any],
) -> Approval:
    """A new pending request, flushed, with its ``approval.request`` audit event."""
    approval = Approval(action=action, params=params, requested_by=requested_by, state="pending")
    session.add(approval)
    session.flush()
    record_event(
        session,
        actor=f"user:{requested_by}",
        action="approval.request",
        target=f"approval:{approval.id}",
        origin=origin,
        details={"action": action, **details},
    )
    return approval


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
    if action not in ACTIONS:
        raise ApprovalError(f"unknown action {action!r}")
    _entitled(session, requested_by, action)
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
    details = {**params, "entry_ids": params.get("entry_ids", [])[:100]}
    return _file(
        session,
        action=action,
        params=params,
        requested_by=requested_by,
        origin=origin,
        details=details,
    )


def propose_allow(
    session: Session,
    *,
    bank: Bank,
    upload_id: str,
    review_item_id: int,
    requested_by: int,
    origin: str | None = None,
) -> Approval:
    """File a pending allow proposal: add upload ``upload_id``'s image to allow bank ``bank``
    once a second person approves; audited ``approval.request``. Adds nothing to the bank.

    Raises:
        ApprovalError: ``bank`` is not an allow bank, or the proposer is not an active reviewer
            or admin.
    """
    _entitled(session, requested_by, ADD_ALLOW)
    if bank.kind != "allow":
        raise ApprovalError(f"{bank.name!r} is a {bank.kind} bank, not an allow bank")
    params: dict[str, Any] = {
        "bank_id": bank.id,
        "bank": bank.name,
        "upload_id": upload_id,
        "review_item_id": review_item_id,
    }
    return _file(
        session,
        action=ADD_ALLOW,
        params=params,
        requested_by=requested_by,
        origin=origin,
        details=params,
    )


def locked_pending(session: Session, approval_id: int, user_id: int) -> Approval:
    """The pending request, locked, once ``user_id`` is checked to be active with a role that
    may decide its action (:data:`APPROVER_ROLES`).

    Raises:
        ApprovalError: no such request, not pending, or the user may not decide it.
    """
    approval = session.get(Approval, approval_id, with_for_update=True)
    if approval is None:
        raise ApprovalError(f"no approval request {approval_id}")
    _entitled(session, user_id, approval.action)
    if approval.state != "pending":
        raise ApprovalError(f"approval request {approval_id} is already {approval.state}")
    return approval


def checked_pending(
    runtime: Runtime, approval_id: int, approver_id: int, *, origin: str | None
) -> tuple[str, dict[str, Any]]:
    """(action, params) of a pending request ``approver_id`` may approve, read before the work.

    A self-approval is recorded (``approval.approve``, outcome ``denied``) in a transaction of
    its own, then refused.

    Raises:
        ApprovalError: as :func:`locked_pending`, or ``approver_id`` filed the request.
    """
    with runtime.sessions() as session:
        approval = locked_pending(session, approval_id, approver_id)
        action, params, requested_by = approval.action, dict(approval.params), approval.requested_by
    if requested_by == approver_id:
        with transaction(runtime.sessions) as session:
            record_event(
                session,
                actor=f"user:{approver_id}",
                action="approval.approve",
                target=f"approval:{approval_id}",
                origin=origin,
                outcome="denied",
                details={"action": action, "reason": "self_approval"},
            )
        second = "a second admin" if action in ACTIONS else "a second reviewer or an admin"
        raise ApprovalError(f"{second} must approve: you filed this request")
    return action, params


def mark_approved(
    session: Session, approval: Approval, approver_id: int, origin: str | None
) -> None:
    """Set ``approval`` approved by ``approver_id`` now and record ``approval.approve``."""
    details = {"action": approval.action, "requested_by": approval.requested_by}
    _close(session, approval, approver_id, verdict="approve", origin=origin, details=details)


def _close(
    session: Session,
    approval: Approval,
    user_id: int,
    *,
    verdict: str,
    origin: str | None,
    details: dict[str, Any],
) -> None:
    """Close ``approval`` with ``verdict`` (approve | reject) by ``user_id`` now, audited
    ``approval.<verdict>``."""
    state = {"approve": "approved", "reject": "rejected"}[verdict]
    approval.state, approval.approved_by, approval.decided_at = state, user_id, datetime.now(UTC)
    record_event(
        session,
        actor=f"user:{user_id}",
        action=f"approval.{verdict}",
        target=f"approval:{approval.id}",
        origin=origin,
        details=details,
    )


def approve(
    runtime: Runtime, approval_id: int, *, approver_id: int, origin: str | None = None
) -> int:
    """Approve and carry out a pending removal request; returns the new snapshot version.

    Raises:
        ApprovalError: not pending, not a removal (allow proposals:
            :func:`moderation.governance.allow_proposals.approve_allow`), self-approval
            (audited), or the approver is not an active admin.
    """
    action, _ = checked_pending(runtime, approval_id, approver_id, origin=origin)
    if action not in ACTIONS:
        raise ApprovalError(f"approval request {approval_id} is not a removal ({action})")

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        approval = locked_pending(session, approval_id, approver_id)
        params = dict(approval.params)
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
        mark_approved(session, approval, approver_id, origin)
        record_event(
            session,
            actor=f"user:{approver_id}",
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
        ApprovalError: not pending, or the rejecter may not decide it (an active admin;
            for allow proposals, an active reviewer or admin).
    """
    approval = locked_pending(session, approval_id, approver_id)
    details = {"action": approval.action}
    _close(session, approval, approver_id, verdict="reject", origin=origin, details=details)
    return approval


def list_approvals(
    session: Session, *, state: str | None = "pending", actions: Sequence[str] = ACTIONS
) -> list[ApprovalView]:
    """Requests (newest first, at most 200) of ``actions`` (default: removals), by state (None:
    all)."""
    query = select(Approval, User.email).join(User, Approval.requested_by == User.id)
    query = query.where(Approval.action.in_(list(actions)))
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
