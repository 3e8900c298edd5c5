"""What the console shows of appeals: the open ones beside the review queue, and one appeal's
page (the platform's reason, the appealed decision and its statement of reasons). Working on
them is :mod:`moderation.governance.appeals`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from moderation.matching.statements import statement_json
from moderation.storage.decisions import Appeal, Decision
from moderation.storage.models import Screening, Upload, User

QUEUE_LIMIT = 100
"""Open appeals listed on the queue page (oldest first)."""


@dataclass(frozen=True)
class AppealRow:
    """One unsettled appeal as the queue page lists it."""

    id: str
    upload_id: str
    external_id: str | None
    reason: str
    original_decision: str
    state: str
    created_at: datetime
    mine: bool  # the viewer holds it
    may_work: bool  # the viewer did not make the appealed decision


def open_appeals(session: Session, viewer_id: int) -> list[AppealRow]:
    """Unsettled appeals, oldest first (at most :data:`QUEUE_LIMIT`); for a reviewer scoped to
    one API client (``users.client_id``), that client's only."""
    viewer = session.get(User, viewer_id)
    scope = None if viewer is None else viewer.client_id
    rows = session.execute(
        select(Appeal, Upload.external_id)
        .join(Upload, Upload.id == Appeal.upload_id)
        .where(Appeal.state != "decided")
        .where(true() if scope is None else Appeal.client_id == scope)
        .order_by(Appeal.created_at.asc(), Appeal.id.asc())
        .limit(QUEUE_LIMIT)
    ).all()
    return [
        AppealRow(
            id=appeal.id,
            upload_id=appeal.upload_id,
            external_id=external_id,
            reason=appeal.reason,
            original_decision=appeal.original_decision,
            state=appeal.state,
            created_at=appeal.created_at,
            mine=appeal.claimed_by == viewer_id and appeal.state == "claimed",
            may_work=appeal.original_decided_by != viewer_id,
        )
        for appeal, external_id in rows
    ]


@dataclass(frozen=True)
class AppealPage:
    """One appeal's page: the appeal, the appealed decision's statement of reasons and the
    screening's score and matches' signals (no bank labels beyond the screening's reason)."""

    appeal: Appeal
    external_id: str | None
    statement: dict[str, Any] | None
    screening: dict[str, Any] | None
    mine: bool
    may_work: bool


def appeal_page(session: Session, appeal_id: str, viewer_id: int) -> AppealPage | None:
    """The page of ``appeal_id`` for ``viewer_id``, or None when there is no such appeal."""
    appeal = session.get(Appeal, appeal_id)
    if appeal is None:
        return None
    decision = session.get(Decision, appeal.decision_id)
    screening = session.scalar(select(Screening).where(Screening.upload_id == appeal.upload_id))
    upload = session.get(Upload, appeal.upload_id)
    session.expunge(appeal)
    return AppealPage(
        appeal=appeal,
        external_id=upload.external_id if upload else None,
        statement=statement_json(decision) if decision else None,
        screening=(
            {
                "decision": screening.decision,
                "score": screening.score,
                "reason": screening.reason,
                "policy": screening.policy,
            }
            if screening
            else None
        ),
        mine=appeal.claimed_by == viewer_id and appeal.state == "claimed",
        may_work=appeal.original_decided_by != viewer_id,
    )


def appeal_counts(session: Session, since: datetime) -> dict[str, int]:
    """``open``: unsettled appeals now; ``upheld``, ``overturned``: settled since ``since``."""
    settled = dict(
        session.execute(
            select(Appeal.outcome, func.count())
            .where(Appeal.state == "decided", Appeal.decided_at >= since)
            .group_by(Appeal.outcome)
        ).all()
    )
    waiting = session.scalar(
        select(func.count()).select_from(Appeal).where(Appeal.state != "decided")
    )
    return {
        "open": int(waiting or 0),
        "upheld": int(settled.get("upheld", 0)),
        "overturned": int(settled.get("overturned", 0)),
    }
