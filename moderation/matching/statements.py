"""Statements of reasons (EU Digital Services Act, Art. 17 and the Commission's transparency
database schema): one :class:`~moderation.storage.models.Decision` row per decision on an
upload, whoever made it.

Fields (the transparency database's names, lower-cased): ``decision_ground``
(``illegal_content`` or ``incompatible_with_terms``, from the category's policy, only for a
restriction: ``block``), ``automated_detection`` (always true here: every upload is found by the
automated screening), ``automated_decision`` (false when a person decided: a reviewer or an
appeal), ``content_type`` (``image``) and ``category`` (the bank category). The newest row is
the upload's current decision (:func:`current_statement`).
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.storage.decisions import Decision
from moderation.storage.models import Screening, Upload

GROUNDS: tuple[str, ...] = ("illegal_content", "incompatible_with_terms")
"""DSA transparency database ``decision_ground`` values (DECISION_GROUND_*)."""
DEFAULT_GROUND = "incompatible_with_terms"
"""Ground of a block whose category names none (``CategoryRules.decision_ground``'s default)."""
SOURCES: tuple[str, ...] = ("screening", "review", "appeal")
OVERTURNED: dict[str, str] = {"block": "allow", "allow": "block"}
"""Decisions a platform may appeal -> what overturning them on appeal makes of them."""
CONTENT_TYPE = "image"
"""The only content type this service screens (DSA ``content_type``: CONTENT_TYPE_IMAGE)."""


def screening_ground(explanation: dict[str, Any] | None) -> str:
    """The decision ground of the category the screening's top match was held to (copied into
    its explanation's ``thresholds`` by ``moderation.matching.decision``), else the default."""
    thresholds = (explanation or {}).get("thresholds")
    ground = thresholds.get("decision_ground") if isinstance(thresholds, dict) else None
    return ground if ground in GROUNDS else DEFAULT_GROUND


def record_decision(
    session: Session,
    upload_id: str,
    *,
    source: str,
    decision: str,
    screening: Screening | None,
    decided_by: int | None = None,
    reason: str | None = None,
    flush: bool = True,
) -> Decision:
    """Add the decision row of ``upload_id`` (in the caller's transaction) and return it
    (flushed unless ``flush`` is false: a batch flushes its rows once).

    ``source``: screening (automated decision) | review | appeal (a person, ``decided_by``).
    ``screening`` gives the category, policy and ground; ``reason`` defaults to its reason.

    Raises:
        ValueError: unknown ``source``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}")
    row = Decision(
        upload_id=upload_id,
        source=source,
        decision=decision,
        decision_ground=(
            screening_ground(screening.explanation if screening else None)
            if decision == "block"
            else None
        ),
        automated_detection=True,
        automated_decision=source == "screening",
        content_type=CONTENT_TYPE,
        category=screening.category if screening else None,
        policy=screening.policy if screening else None,
        reason=reason if reason is not None else (screening.reason if screening else None),
        decided_by=decided_by,
    )
    session.add(row)
    if flush:
        session.flush()
    return row


def current_statement(session: Session, upload_id: str) -> Decision | None:
    """The upload's newest decision row (its current decision), or None before any."""
    return session.scalar(
        select(Decision)
        .where(Decision.upload_id == upload_id)
        .order_by(Decision.id.desc())
        .limit(1)
    )


def statement_json(row: Decision) -> dict[str, Any]:
    """The API's ``statement_of_reasons``: ``decision``, ``source``, ``decision_ground``,
    ``automated_detection``, ``automated_decision``, ``content_type``, ``category``,
    ``decided_at`` (ISO 8601 UTC)."""
    return {
        "decision": row.decision,
        "source": row.source,
        "decision_ground": row.decision_ground,
        "automated_detection": row.automated_detection,
        "automated_decision": row.automated_decision,
        "content_type": row.content_type,
        "category": row.category,
        "decided_at": _aware(row.created_at).isoformat(),
    }


EXPORT_FIELDS: tuple[str, ...] = (
    "decision_id",
    "upload_id",
    "external_id",
    "client_id",
    "source",
    "decision",
    "decision_ground",
    "automated_detection",
    "automated_decision",
    "content_type",
    "category",
    "policy",
    "reason",
    "decided_by",
    "decided_at",
)
"""Columns of :func:`export_decisions`, in order (the CSV header)."""
EXPORT_FORMATS: tuple[str, ...] = ("csv", "jsonl")


def _export_row(row: Decision, external_id: str | None, client_id: int | None) -> dict[str, Any]:
    return {
        "decision_id": row.id,
        "upload_id": row.upload_id,
        "external_id": external_id,
        "client_id": client_id,
        "source": row.source,
        "decision": row.decision,
        "decision_ground": row.decision_ground,
        "automated_detection": row.automated_detection,
        "automated_decision": row.automated_decision,
        "content_type": row.content_type,
        "category": row.category,
        "policy": row.policy,
        "reason": row.reason,
        "decided_by": None if row.decided_by is None else f"user:{row.decided_by}",
        "decided_at": _aware(row.created_at).isoformat(),
    }


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def export_decisions(
    session: Session,
    out: TextIO,
    *,
    fmt: str,
    since: datetime | None = None,
    actor: str,
    origin: str | None = None,
) -> int:
    """Write every decision (oldest first; from ``since``, inclusive, when given) to ``out`` as
    CSV (header :data:`EXPORT_FIELDS`; booleans ``true``/``false``, null as empty) or JSON
    Lines (one object per decision); returns how many. Streams in batches of 1000 rows. The
    export is audited (``decisions.export`` by ``actor``) in the caller's transaction.

    Raises:
        ValueError: ``fmt`` not in :data:`EXPORT_FORMATS`.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}")
    query = (
        select(Decision, Upload.external_id, Upload.client_id)
        .join(Upload, Upload.id == Decision.upload_id)
        .order_by(Decision.id)
        .execution_options(yield_per=1000)
    )
    if since is not None:
        query = query.where(Decision.created_at >= since)
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    count = 0
    for row, external_id, client_id in session.execute(query):
        record = _export_row(row, external_id, client_id)
        if writer is not None:
            writer.writerow({k: _csv_value(v) for k, v in record.items()})
        else:
            out.write(json.dumps(record, sort_keys=False) + "\n")
        count += 1
    record_event(
        session,
        actor=actor,
        action="decisions.export",
        origin=origin,
        details={"format": fmt, "since": since.isoformat() if since else None, "count": count},
    )
    return count


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value
