"""The last stage of screening: a :class:`~moderation.matching.decision.ScreeningResult` written
to the database as a screening row with its match rows, a review item when a human must look,
the upload's legal hold (:func:`place_block_hold`, also called for a reviewer's confirm), its
statement of reasons (:mod:`moderation.matching.statements`), the
matched entries' daily match counts (flood control,
:mod:`moderation.banks.match_counts`) and the ``screening.decide`` audit event, in the caller's
transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import EventSpec, record_event, record_events
from moderation.banks.match_counts import count_matches, utc_today
from moderation.matching.decision import ScreeningResult
from moderation.matching.statements import record_decision
from moderation.storage.models import LegalHold, Match, ReviewItem, Screening, Upload

HOLD_SOURCES: tuple[str, ...] = ("automatic", "review", "manual")
"""Who placed a hold: a block decision, a reviewer's confirm, an admin or the DPO by hand."""


def record_result(
    session: Session, upload: Upload, result: ScreeningResult, *, actor: str = "screening"
) -> Screening:
    """Write a result: screening row, match rows, review item if needed, its decision row
    (statement of reasons), one more match today
    (UTC) for each matched entry (``entry_match_counts``), audit event.

    Idempotent by upload: an upload that already has a screening keeps it (returned as is).
    """
    return record_results(session, [(upload, result)], actor=actor)[0]


def record_results(
    session: Session,
    items: Sequence[tuple[Upload, ScreeningResult]],
    *,
    actor: str = "screening",
) -> list[Screening]:
    """:func:`record_result` for a batch, in order, with one query for existing screenings,
    one flush per kind of row, one match-count statement per distinct count and the audit
    events appended at once (:func:`~moderation.audit.log.record_events`): the rows written
    are the same, in a fraction of the statements (``moderation screen`` records a batch).
    """
    ids = [upload.id for upload, _ in items]
    existing = {
        s.upload_id: s
        for s in session.scalars(select(Screening).where(Screening.upload_id.in_(ids)))
    }
    fresh: list[tuple[Upload, ScreeningResult, Screening]] = []
    for upload, result in items:
        if upload.id in existing:
            continue
        screening = existing[upload.id] = _screening_row(upload, result)
        session.add(screening)
        upload.status = "done"
        _hold_and_review(session, upload, result, actor)
        fresh.append((upload, result, screening))
    session.flush()
    matched: Counter[int] = Counter()
    for upload, result, screening in fresh:
        record_decision(
            session,
            upload.id,
            source="screening",
            decision=result.decision,
            screening=screening,
            flush=False,
        )
        matched.update({m.entry.entry_id for m in result.matches})
    by_times: dict[int, list[int]] = {}
    for entry_id, times in matched.items():
        by_times.setdefault(times, []).append(entry_id)
    for times, entry_ids in sorted(by_times.items()):
        count_matches(session, entry_ids, day=utc_today(), times=times)
    record_events(
        session,
        [
            EventSpec(
                actor=actor,
                action="screening.decide",
                target=f"upload:{upload.id}",
                details=_audit_details(upload, result),
            )
            for upload, result, _ in fresh
        ],
    )
    return [existing[upload_id] for upload_id in ids]


def _hold_and_review(session: Session, upload: Upload, result: ScreeningResult, actor: str) -> None:
    """A block's legal hold and a review item, as the result asks."""
    if result.decision == "block" and result.legal_hold_days:
        place_block_hold(
            session,
            upload,
            days=result.legal_hold_days,
            category=result.category,
            source="automatic",
            actor=actor,
        )
    if result.needs_review:
        session.add(
            ReviewItem(
                upload_id=upload.id,
                client_id=upload.client_id,
                category=result.category,
                priority=result.review_priority or 50,
            )
        )


def add_hold(
    session: Session,
    upload: Upload,
    *,
    source: str,
    until: datetime,
    reason: str,
    actor: str,
    origin: str | None = None,
) -> LegalHold:
    """Add a hold row and extend ``upload.legal_hold_until`` to ``until`` if that is later.

    Holds other than ``automatic`` ones are audited here (``hold.place``); an automatic hold is
    part of the ``screening.decide`` event.

    Raises:
        ValueError: unknown ``source`` or empty ``reason``.
    """
    if source not in HOLD_SOURCES:
        raise ValueError(f"hold source must be one of {', '.join(HOLD_SOURCES)}")
    if not reason.strip():
        raise ValueError("a legal hold needs a reason")
    hold = LegalHold(
        upload_id=upload.id,
        source=source,
        reason=reason.strip()[:1000],
        placed_by=actor,
        placed_at=datetime.now(UTC),
        until=until,
    )
    session.add(hold)
    current = upload.legal_hold_until
    if current is None or _utc(current) < until:
        upload.legal_hold_until = until
    session.flush()
    if source != "automatic":
        record_event(
            session,
            actor=actor,
            action="hold.place",
            target=f"upload:{upload.id}",
            origin=origin,
            details={
                "hold_id": hold.id,
                "source": source,
                "reason": hold.reason,
                "until": until.isoformat(),
            },
        )
    return hold


def place_block_hold(
    session: Session,
    upload: Upload,
    *,
    days: int,
    category: str | None,
    source: str,
    actor: str,
    origin: str | None = None,
) -> LegalHold:
    """The hold every block places (a block decision, or a reviewer's confirm): ``days`` from
    now (the policy category's ``legal_hold_days``), with the category as its reason."""
    return add_hold(
        session,
        upload,
        source=source,
        until=datetime.now(UTC) + timedelta(days=days),
        reason=f"block in policy category {category or 'default'}",
        actor=actor,
        origin=origin,
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _screening_row(upload: Upload, result: ScreeningResult) -> Screening:
    """The (unsaved) screening row of ``result``, its match rows attached."""
    screening = Screening(
        upload_id=upload.id,
        decision=result.decision,
        policy=result.policy,
        category=result.category,
        score=result.score,
        reason=result.reason,
        encoder_id=result.encoder_id,
        index_version=result.index_version,
        classifier_version=result.classifier_version,
        timings=result.timings_ms,
        explanation=result.explanation,
    )
    for match in result.matches:
        screening.matches.append(
            Match(
                entry_id=match.entry.entry_id,
                bank_id=match.entry.bank_id,
                cosine=match.cosine,
                pdq_distance=match.pdq_distance,
                probability=match.probability,
                signals=match.record(),
            )
        )
    return screening


def _audit_details(upload: Upload, result: ScreeningResult) -> dict[str, Any]:
    """The ``screening.decide`` audit event's details (after the legal hold is set)."""
    return {
        "decision": result.decision,
        "reason": result.reason,
        "score": result.score,
        "subject_ref": upload.subject_ref,
        "matches": [m.entry.public_id for m in result.matches],
        "index_version": result.index_version,
        "legal_hold_until": (
            upload.legal_hold_until.isoformat() if upload.legal_hold_until else None
        ),
    }
