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
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Bank, Match, ReviewItem, Screening, Upload


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def result_json(session: Session, screening: Screening, keyring: KeyRing | None) -> dict[str, Any]:
    """The result object: ``decision``, ``policy``, ``score``, ``reason``, ``category``,
    ``matches`` (``bank``, ``entry_id``, ``label``, ``cosine``, ``pdq_distance``,
    ``probability``), ``timings_ms``, ``index_version``.

    Labels are decrypted with ``keyring``; without one (a payload stored for later delivery,
    see :func:`with_labels`) they are null, so no label is ever stored in clear.
    """
    rows = session.execute(
        select(Match, Bank.name)
        .outerjoin(Bank, Match.bank_id == Bank.id)
        .where(Match.screening_id == screening.id)
        .order_by(Match.id)
    ).all()
    ids = [m.entry_id for m, _ in rows if m.entry_id is not None]
    labels = entry_labels(session, keyring, ids) if keyring is not None else {}
    return {
        "decision": screening.decision,
        "policy": screening.policy,
        "score": _round(screening.score),
        "reason": screening.reason,
        "category": screening.category,
        "matches": [
            {
                "bank": bank_name,
                "entry_id": None if match.entry_id is None else f"e_{match.entry_id}",
                "label": labels.get(match.entry_id) if match.entry_id is not None else None,
                "cosine": _round(match.cosine),
                "pdq_distance": match.pdq_distance,
                "probability": _round(match.probability),
            }
            for match, bank_name in rows
        ],
        "timings_ms": {k: round(float(v), 2) for k, v in (screening.timings or {}).items()},
        "index_version": screening.index_version,
    }


def upload_view(session: Session, upload: Upload, keyring: KeyRing | None) -> dict[str, Any]:
    """``{"id", "external_id", "status", "received_at", "result"}`` (``result`` null until done),
    plus ``review`` (``state``, ``decision``, ``decided_at``) once a reviewer has decided.
    ``keyring``: as :func:`result_json`."""
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
        view["result"] = result_json(session, screening, keyring)
    item = session.scalar(select(ReviewItem).where(ReviewItem.upload_id == upload.id))
    if item is not None and item.decided_at is not None:
        view["review"] = {
            "state": item.state,
            "decision": item.decision,
            "decided_at": item.decided_at.isoformat(),
        }
    return view


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
