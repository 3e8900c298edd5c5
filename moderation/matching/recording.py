"""The last stage of screening: a :class:`~moderation.matching.decision.ScreeningResult` written
to the database as a screening row with its match rows, a review item when a human must look,
the upload's legal hold, its statement of reasons (:mod:`moderation.matching.statements`), the
matched entries' daily match counts (flood control,
:mod:`moderation.banks.match_counts`) and the ``screening.decide`` audit event, in the caller's
transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.match_counts import count_matches, utc_today
from moderation.matching.decision import ScreeningResult
from moderation.matching.statements import record_decision
from moderation.storage.models import Match, ReviewItem, Screening, Upload


def record_result(
    session: Session, upload: Upload, result: ScreeningResult, *, actor: str = "screening"
) -> Screening:
    """Write a result: screening row, match rows, review item if needed, its decision row
    (statement of reasons), one more match today
    (UTC) for each matched entry (``entry_match_counts``), audit event.

    Idempotent by upload: an upload that already has a screening keeps it (returned as is).
    """
    existing = session.query(Screening).filter_by(upload_id=upload.id).one_or_none()
    if existing is not None:
        return existing
    screening = _screening_row(upload, result)
    session.add(screening)
    upload.status = "done"
    if result.decision == "block" and result.legal_hold_days:
        upload.legal_hold_until = datetime.now(UTC) + timedelta(days=result.legal_hold_days)
    if result.needs_review:
        session.add(
            ReviewItem(
                upload_id=upload.id,
                category=result.category,
                priority=result.review_priority or 50,
            )
        )
    session.flush()
    record_decision(
        session, upload.id, source="screening", decision=result.decision, screening=screening
    )
    count_matches(session, (m.entry.entry_id for m in result.matches), day=utc_today())
    record_event(
        session,
        actor=actor,
        action="screening.decide",
        target=f"upload:{upload.id}",
        details=_audit_details(upload, result),
    )
    return screening


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
                signals={"agreed": list(match.signals), "level": match.level, "frame": match.frame},
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
