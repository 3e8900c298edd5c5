"""The public view of an upload and its result, as the HTTP hook and callbacks show it.

One function builds it from the database, so ``GET /api/v1/screenings/{id}`` and the callback
body carry the same result object (ARCHITECTURE.md "HTTP upload hook").
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.tenancy import applicable_bank_ids
from moderation.matching.statements import OVERTURNED, current_statement, statement_json
from moderation.storage.decisions import Appeal
from moderation.storage.models import Bank, Entry, Match, ReviewItem, Screening, Upload


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def match_json(
    match: Match, bank_name: str | None, label: str | None, *, named: bool
) -> dict[str, Any]:
    """One match as a client sees it. Unless ``named`` (the bank applies to the client,
    :mod:`moderation.banks.tenancy`), the bank name, entry id and label are null: nothing
    that identifies another tenant's bank or its entries."""
    return {
        "bank": bank_name if named else None,
        "entry_id": f"e_{match.entry_id}" if named and match.entry_id is not None else None,
        "label": label if named else None,
        "cosine": _round(match.cosine),
        "pdq_distance": match.pdq_distance,
        "probability": _round(match.probability),
    }


def result_json(
    session: Session, screening: Screening, client_id: int | None = None
) -> dict[str, Any]:
    """The result object: ``decision``, ``policy``, ``score``, ``reason``, ``category``,
    ``matches`` (``bank``, ``entry_id``, ``label``, ``cosine``, ``pdq_distance``,
    ``probability``; see :func:`match_json`), ``timings_ms``, ``index_version``, as API client
    ``client_id`` (None: the operator, who sees every bank) may see it."""
    rows = session.execute(
        select(Match, Bank.name, Entry.label)
        .outerjoin(Bank, Match.bank_id == Bank.id)
        .outerjoin(Entry, Match.entry_id == Entry.id)
        .where(Match.screening_id == screening.id)
        .order_by(Match.id)
    ).all()
    named = applicable_bank_ids(session, client_id)
    return {
        "decision": screening.decision,
        "policy": screening.policy,
        "score": _round(screening.score),
        "reason": screening.reason,
        "category": screening.category,
        "matches": [
            match_json(match, bank_name, label, named=named is None or match.bank_id in named)
            for match, bank_name, label in rows
        ],
        "timings_ms": {k: round(float(v), 2) for k, v in (screening.timings or {}).items()},
        "index_version": screening.index_version,
    }


def upload_view(session: Session, upload: Upload) -> dict[str, Any]:
    """``{"id", "external_id", "status", "received_at", "result"}`` (``result`` null until done,
    and as the upload's own client may see it: :func:`result_json`), plus ``review`` (``state``,
    ``decision``, ``decided_at``) once a reviewer has decided, and ``appeal``
    (:func:`appeal_json`) once the platform has appealed. ``result`` carries the current
    decision's ``statement_of_reasons`` (``moderation.matching.statements``)."""
    view: dict[str, Any] = {
        "id": upload.id,
        "external_id": upload.external_id,
        "status": upload.status,
        "received_at": upload.received_at.isoformat(),
        "result": None,
    }
    screening = session.scalar(select(Screening).where(Screening.upload_id == upload.id))
    if screening is not None:
        view["status"] = "done"
        view["result"] = result_json(session, screening, upload.client_id)
        statement = current_statement(session, upload.id)
        if statement is not None:
            view["result"]["statement_of_reasons"] = statement_json(statement)
    item = session.scalar(select(ReviewItem).where(ReviewItem.upload_id == upload.id))
    if item is not None and item.decided_at is not None:
        view["review"] = {
            "state": item.state,
            "decision": item.decision,
            "decided_at": item.decided_at.isoformat(),
        }
    appeal = session.scalar(
        select(Appeal).where(Appeal.upload_id == upload.id).order_by(Appeal.created_at.desc())
    )
    if appeal is not None:
        view["appeal"] = appeal_json(appeal)
    return view


def appeal_json(appeal: Appeal) -> dict[str, Any]:
    """``{"id", "state", "reason", "original_decision", "outcome", "decision", "created_at",
    "decided_at"}``: ``outcome`` upheld | overturned and ``decision`` (what the upload is now)
    are null until decided."""
    decided = appeal.outcome is not None
    return {
        "id": appeal.id,
        "state": appeal.state,
        "reason": appeal.reason,
        "original_decision": appeal.original_decision,
        "outcome": appeal.outcome,
        "decision": (
            None
            if not decided
            else OVERTURNED[appeal.original_decision]
            if appeal.outcome == "overturned"
            else appeal.original_decision
        ),
        "created_at": appeal.created_at.isoformat(),
        "decided_at": appeal.decided_at.isoformat() if appeal.decided_at else None,
    }
