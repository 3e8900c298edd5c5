"""The public view of an upload and its result, as the HTTP hook and callbacks show it.

One function builds it from the database, so ``GET /api/v1/screenings/{id}`` and the callback
body carry the same result object (ARCHITECTURE.md "HTTP upload hook").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.records import parse_entry_id
from moderation.banks.sealed_fields import entry_labels
from moderation.banks.tenancy import applicable_bank_ids
from moderation.crypto.keys import KeyRing
from moderation.matching.explain import match_explanation, result_decided_by
from moderation.matching.statements import OVERTURNED, current_statement, statement_json
from moderation.storage.decisions import Appeal
from moderation.storage.models import Bank, Match, ReviewItem, Screening, Upload


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def match_json(
    match: Match, bank_name: str | None, label: str | None, *, named: bool
) -> dict[str, Any]:
    """One match as a client sees it. Unless ``named`` (the bank applies to the client,
    :mod:`moderation.banks.tenancy`), the bank name, entry id and label are null: nothing
    that identifies another tenant's bank or its entries. The rest (values, ``level``,
    ``decided_by``, ``signals``; a video's ``timestamp_s``) is
    :func:`moderation.matching.explain.match_explanation` of the stored row, as
    ``moderation screen`` shows it."""
    return {
        "bank": bank_name if named else None,
        "entry_id": f"e_{match.entry_id}" if named and match.entry_id is not None else None,
        "label": label if named else None,
        **match_explanation(
            match.signals,
            cosine=match.cosine,
            pdq_distance=match.pdq_distance,
            probability=match.probability,
        ),
    }


def result_json(
    session: Session,
    screening: Screening,
    keyring: KeyRing | None,
    client_id: int | None = None,
) -> dict[str, Any]:
    """The result object: ``decision``, ``policy``, ``score``, ``reason``, ``category``,
    ``decided_by`` (the deciding stage, :func:`moderation.matching.explain.result_decided_by`),
    ``matches`` (``bank``, ``entry_id``, ``label``, ``cosine``, ``pdq_distance``,
    ``probability``, ``level``, ``decided_by``, ``signals``; see :func:`match_json`),
    ``timings_ms``, ``index_version``, as API client
    ``client_id`` (None: the operator, who sees every bank) may see it.

    Labels are decrypted with ``keyring``; without one (a payload stored for later delivery,
    see :func:`with_labels`) they are null, so no label is ever stored in clear.
    """
    rows = session.execute(
        select(Match, Bank.name)
        .outerjoin(Bank, Match.bank_id == Bank.id)
        .where(Match.screening_id == screening.id)
        .order_by(Match.id)
    ).all()
    named = applicable_bank_ids(session, client_id)
    ids = [m.entry_id for m, _ in rows if m.entry_id is not None]
    labels = entry_labels(session, keyring, ids) if keyring is not None else {}
    matches = [
        match_json(
            match,
            bank_name,
            labels.get(match.entry_id) if match.entry_id is not None else None,
            named=named is None or match.bank_id in named,
        )
        for match, bank_name in rows
    ]
    return {
        "decision": screening.decision,
        "policy": screening.policy,
        "score": _round(screening.score),
        "reason": screening.reason,
        "category": screening.category,
        "decided_by": result_decided_by(screening.decision, screening.reason, matches),
        "matches": matches,
        "timings_ms": {k: round(float(v), 2) for k, v in (screening.timings or {}).items()},
        "index_version": screening.index_version,
    }


def upload_view(session: Session, upload: Upload, keyring: KeyRing | None) -> dict[str, Any]:
    """``{"id", "external_id", "status", "received_at", "result"}`` (``result`` null until done,
    and as the upload's own client may see it: :func:`result_json`, labels decrypted with
    ``keyring``), plus ``review`` (``state``, ``decision``, ``decided_at``) once a reviewer has
    decided, and ``appeal`` (:func:`appeal_json`) once the platform has appealed. ``result``
    carries the current decision's ``statement_of_reasons`` (``moderation.matching.statements``)."""
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
        view["result"] = result_json(session, screening, keyring, upload.client_id)
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


def with_labels(session: Session, keyring: KeyRing, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored view (:func:`upload_view` without keys) with its matches' labels
    decrypted, just before it is sent; an entry deleted meanwhile keeps a null label."""
    result = payload.get("result")
    if not isinstance(result, dict) or not result.get("matches"):
        return dict(payload)
    ids = [parse_entry_id(m["entry_id"]) for m in result["matches"] if m.get("entry_id")]
    labels = entry_labels(session, keyring, ids)
    matches = [
        {**m, "label": labels.get(parse_entry_id(m["entry_id"])) if m.get("entry_id") else None}
        for m in result["matches"]
    ]
    return {**payload, "result": {**result, "matches": matches}}
