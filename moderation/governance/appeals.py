"""Appeals: a platform contests a decision; a reviewer other than its decider settles it.

Flow (EU DSA Art. 20, internal complaint handling): :func:`file_appeal` (``POST
/api/v1/screenings/<id>/appeal``) records an :class:`~moderation.storage.models.Appeal` against
the upload's current decision (its newest statement of reasons, :mod:`moderation.matching.
statements`): only a final ``block`` or ``allow``, only the client's own upload, one appeal per
decision, never an appeal of an appeal's outcome. A reviewer claims it in the console
(:func:`claim_appeal`; the person who made the appealed decision never may, anyone may when it
was automated) and settles it (:func:`decide_appeal`): ``upheld`` keeps the decision,
``overturned`` flips it (block <-> allow; a new block gets its category's legal hold, as an
automatic one does). Either outcome is a new decision row (a person
decided), an ``appeal.decide`` audit event, a signed ``appeal.decided`` callback
(:func:`moderation.service.callbacks.notify_decision`) and one count of
``moderation_appeals_total{outcome}``. The platform's reason text stays out of the audit log (it
may hold personal data, and the log cannot be erased).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.governance.review import _bump, exposure, resolve_now
from moderation.matching.recording import place_block_hold
from moderation.matching.statements import OVERTURNED, current_statement, record_decision
from moderation.service.callbacks import notify_decision
from moderation.service.metrics import APPEALS
from moderation.storage.db import transaction
from moderation.storage.decisions import Appeal
from moderation.storage.models import Screening, Upload, User

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

APPEALABLE = OVERTURNED
"""Decisions a platform may appeal -> what overturning makes of them."""
OUTCOMES: tuple[str, ...] = ("upheld", "overturned")
MAX_REASON = 2000
"""Longest appeal reason, characters (the console's notes limit)."""
REVIEWER_ROLES = frozenset({"admin", "reviewer"})


class AppealError(Exception):
    """An appeal operation was refused; ``status`` and ``code`` are the HTTP answer."""

    status = 400
    code = "bad_request"


class AppealNotFound(AppealError):
    """No such upload or appeal (for this client)."""

    status = 404
    code = "not_found"


class AppealConflict(AppealError):
    """Nothing to appeal yet, already appealed, or the appeal is settled or held by another."""

    status = 409
    code = "conflict"


class AppealForbidden(AppealError):
    """This person may not work on the appeal (they made the appealed decision)."""

    status = 403
    code = "forbidden"


@dataclass(frozen=True)
class AppealOutcome:
    """What :func:`decide_appeal` did: ``decision`` is the upload's decision now."""

    appeal_id: str
    upload_id: str
    outcome: str
    decision: str


def file_appeal(
    runtime: Runtime, *, client_id: int, upload_id: str, reason: str, origin: str | None = None
) -> Appeal:
    """Appeal the current decision of ``client_id``'s upload ``upload_id``; audited
    (``appeal.file``) and counted (``filed``). Returns the committed appeal (detached).

    Raises:
        AppealNotFound: no such upload of this client (another client's looks missing).
        AppealError: empty reason, or longer than :data:`MAX_REASON` characters.
        AppealConflict: not decided yet (queued, in review, unscannable), already appealed, or
            the decision is itself an appeal's outcome.
    """
    text = (reason or "").strip()
    if not text or len(text) > MAX_REASON:
        raise AppealError(f"reason is required, at most {MAX_REASON} characters")
    try:
        with transaction(runtime.sessions) as session:
            appeal = _new_appeal(session, client_id, upload_id[:32], text)
            record_event(
                session,
                actor=f"client:{client_id}",
                action="appeal.file",
                target=f"upload:{appeal.upload_id}",
                origin=origin,
                details={"appeal_id": appeal.id, "decision": appeal.original_decision},
            )
            session.expunge(appeal)
    except IntegrityError as exc:  # a concurrent appeal of the same decision won
        raise AppealConflict("this decision is already appealed") from exc
    APPEALS.labels("filed").inc()
    return appeal


def _new_appeal(session: Session, client_id: int, upload_id: str, reason: str) -> Appeal:
    upload = session.scalar(
        select(Upload).where(Upload.id == upload_id, Upload.client_id == client_id)
    )
    if upload is None:
        raise AppealNotFound("no such screening")
    statement = current_statement(session, upload.id)
    if statement is None or statement.decision not in APPEALABLE:
        raise AppealConflict("the screening has no final block or allow decision to appeal yet")
    if statement.source == "appeal":
        raise AppealConflict("this decision is the outcome of an appeal and is final")
    if session.scalar(select(Appeal.id).where(Appeal.decision_id == statement.id)):
        raise AppealConflict("this decision is already appealed")
    appeal = Appeal(
        upload_id=upload.id,
        client_id=client_id,
        decision_id=statement.id,
        reason=reason,
        original_decision=statement.decision,
        original_decided_by=statement.decided_by,
        state="open",
    )
    session.add(appeal)
    session.flush()
    return appeal


def _check_reviewer(session: Session, appeal: Appeal, reviewer_id: int) -> None:
    reviewer = session.get(User, reviewer_id)
    if reviewer is None or reviewer.disabled or reviewer.role not in REVIEWER_ROLES:
        raise AppealForbidden(f"no active reviewer {reviewer_id}")
    if reviewer.client_id is not None and appeal.client_id != reviewer.client_id:
        # A reviewer scoped to one API client (tenant isolation) never sees another's appeals.
        raise AppealNotFound(f"no appeal {appeal.id}")
    if appeal.original_decided_by == reviewer_id:
        raise AppealForbidden("you made the appealed decision: another reviewer must settle it")


def claim_appeal(
    session: Session,
    appeal_id: str,
    *,
    reviewer_id: int,
    lease_seconds: int,
    daily_limit: int,
    now: datetime | None = None,
) -> Appeal:
    """Lease an open appeal (or renew the reviewer's lease on it); audited (``appeal.claim``)
    and counted in the reviewer's daily exposure.

    Raises:
        AppealNotFound: no such appeal.
        AppealForbidden: the reviewer made the appealed decision, or is no active reviewer.
        AppealConflict: decided, held by another reviewer, or the daily exposure limit reached.
    """
    appeal = session.get(Appeal, appeal_id, with_for_update=True)
    if appeal is None:
        raise AppealNotFound(f"no appeal {appeal_id}")
    _check_reviewer(session, appeal, reviewer_id)
    moment = resolve_now(now)
    renewing = appeal.claimed_by == reviewer_id and appeal.state == "claimed"
    seen = exposure(session, reviewer_id, limit=daily_limit, now=moment)
    if not renewing and seen.remaining <= 0:
        raise AppealConflict(f"daily limit of {daily_limit} review items reached")
    won = session.execute(
        update(Appeal)
        .where(
            Appeal.id == appeal.id,
            or_(
                Appeal.state == "open",
                Appeal.claimed_by == reviewer_id,
                Appeal.lease_until < moment,
            ),
            Appeal.state != "decided",
        )
        .values(
            state="claimed",
            claimed_by=reviewer_id,
            lease_until=moment + timedelta(seconds=lease_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:  # type: ignore[attr-defined]
        raise AppealConflict("the appeal is settled or another reviewer holds it")
    session.refresh(appeal)
    if not renewing:
        _bump(session, reviewer_id, moment, items=1)
        record_event(
            session,
            actor=f"user:{reviewer_id}",
            action="appeal.claim",
            target=f"appeal:{appeal.id}",
        )
    return appeal


def record_appeal_reveal(
    session: Session,
    appeal_id: str,
    reviewer_id: int,
    *,
    origin: str | None = None,
    now: datetime | None = None,
) -> None:
    """Count (daily exposure) and audit (``appeal.reveal``) that the reviewer holding the
    appeal un-blurred its image.

    Raises:
        AppealConflict: the reviewer does not hold the appeal.
    """
    appeal = session.get(Appeal, appeal_id)
    if appeal is None or appeal.state != "claimed" or appeal.claimed_by != reviewer_id:
        raise AppealConflict("the appeal is not claimed by you")
    _bump(session, reviewer_id, resolve_now(now), reveals=1)
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="appeal.reveal",
        target=f"appeal:{appeal.id}",
        origin=origin,
    )


def decide_appeal(
    runtime: Runtime,
    appeal_id: str,
    *,
    reviewer_id: int,
    outcome: str,
    notes: str | None = None,
    origin: str | None = None,
    now: datetime | None = None,
) -> AppealOutcome:
    """Settle an appeal the reviewer holds, in one transaction: a new decision row (overturned:
    block <-> allow), the ``appeal.decide`` audit event and an ``appeal.decided`` callback;
    then one count of ``moderation_appeals_total{outcome}``.

    Raises:
        AppealError: unknown outcome.
        AppealNotFound: no such appeal.
        AppealForbidden: the reviewer made the appealed decision.
        AppealConflict: the reviewer does not hold the appeal (or it is settled).
    """
    if outcome not in OUTCOMES:
        raise AppealError(f"outcome must be one of {', '.join(OUTCOMES)}")
    with transaction(runtime.sessions) as session:
        appeal = session.get(Appeal, appeal_id, with_for_update=True)
        if appeal is None:
            raise AppealNotFound(f"no appeal {appeal_id}")
        _check_reviewer(session, appeal, reviewer_id)
        if appeal.state != "claimed" or appeal.claimed_by != reviewer_id:
            raise AppealConflict("the appeal is not claimed by you")
        moment = resolve_now(now)
        result = _settle(
            session, appeal, reviewer_id, outcome, notes=notes, origin=origin, now=moment
        )
        if result.decision == "block" and outcome == "overturned":
            _hold(session, runtime, appeal.upload_id, reviewer_id)
    APPEALS.labels(outcome).inc()
    return result


def _settle(
    session: Session,
    appeal: Appeal,
    reviewer_id: int,
    outcome: str,
    *,
    notes: str | None,
    origin: str | None,
    now: datetime,
) -> AppealOutcome:
    """The appeal's decision row, state, audit event and callback (the caller's transaction)."""
    original = appeal.original_decision
    decision = APPEALABLE[original] if outcome == "overturned" else original
    screening = session.scalar(select(Screening).where(Screening.upload_id == appeal.upload_id))
    record_decision(
        session,
        appeal.upload_id,
        source="appeal",
        decision=decision,
        screening=screening,
        decided_by=reviewer_id,
        reason=f"appeal_{outcome}",
    )
    appeal.state, appeal.outcome, appeal.notes = "decided", outcome, notes or None
    appeal.decided_by, appeal.decided_at = reviewer_id, now
    appeal.claimed_by, appeal.lease_until = None, None
    session.flush()
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="appeal.decide",
        target=f"appeal:{appeal.id}",
        origin=origin,
        details={
            "upload_id": appeal.upload_id,
            "outcome": outcome,
            "original_decision": appeal.original_decision,
            "decision": decision,
        },
    )
    notify_decision(session, appeal.upload_id, event="appeal.decided")
    return AppealOutcome(appeal.id, appeal.upload_id, outcome, decision)


def _hold(session: Session, runtime: Runtime, upload_id: str, reviewer_id: int) -> None:
    """An allow overturned to block keeps the upload as any block does: the category's legal
    hold (``CategoryRules.legal_hold_days``), placed by the reviewer who overturned it
    (:func:`moderation.matching.recording.place_block_hold`, source ``review``)."""
    upload = session.get(Upload, upload_id)
    screening = session.scalar(select(Screening).where(Screening.upload_id == upload_id))
    if upload is None or screening is None:
        return
    days = runtime.policy.rules_for(screening.category or "").legal_hold_days
    if days:
        place_block_hold(
            session,
            upload,
            days=days,
            category=screening.category,
            source="review",
            actor=f"user:{reviewer_id}",
        )
