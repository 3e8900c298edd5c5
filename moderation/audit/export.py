"""Exporting a time window of the audit chain, with a signed manifest (:func:`export_events`).

Writes the events as JSON lines or CSV (formats defined in :mod:`moderation.audit.offline`, so an
auditor can check an export without this package), streamed with a running SHA-256, and signs a
manifest of the file with the deployment's audit key (:func:`moderation.audit.log.sign_document`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.log import event_body, record_event, sign_document, stream_events
from moderation.audit.offline import CSV_COLUMNS, MANIFEST_TYPE, canonical_json, escape_cell
from moderation.storage.models import AuditEvent

logger = logging.getLogger(__name__)

ExportFormat = Literal["jsonl", "csv"]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _csv_line(body: dict[str, Any], event_hash: str) -> bytes:
    buffer = io.StringIO()
    cells: list[str] = []
    for column in CSV_COLUMNS:
        value = event_hash if column == "hash" else body[column]
        if column == "details":
            cells.append(canonical_json(value).decode("utf-8"))
        elif column == "seq":
            cells.append(str(value))
        elif value is None:
            cells.append("")
        else:
            cells.append(escape_cell(str(value)))
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue().encode("utf-8")


def _seq_range(
    session: Session, since: datetime | None, until: datetime | None
) -> tuple[int | None, int | None]:
    query = select(func.min(AuditEvent.seq), func.max(AuditEvent.seq))
    if since is not None:
        query = query.where(AuditEvent.ts >= _utc(since))
    if until is not None:
        query = query.where(AuditEvent.ts < _utc(until))
    low, high = session.execute(query).one()
    return low, high


@dataclass
class _Written:
    """What went into the export file so far: its SHA-256, size and chain span."""

    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    count: int = 0
    first_prev: str | None = None
    head_hash: str | None = None
    last_seq: int | None = None


def _write_events(
    session: Session, fmt: ExportFormat, low: int | None, high: int | None, out: BinaryIO
) -> _Written:
    """Stream events ``low``..``high`` to ``out`` in ``fmt`` (CSV with its header row)."""
    written = _Written()

    def emit(data: bytes) -> None:
        out.write(data)
        written.digest.update(data)
        written.size += len(data)

    if fmt == "csv":
        header = io.StringIO()
        csv.writer(header, lineterminator="\r\n").writerow(CSV_COLUMNS)
        emit(header.getvalue().encode("utf-8"))
    if low is not None and high is not None:
        for row in stream_events(session, after=low - 1, upto=high):
            body = event_body(row)
            if written.first_prev is None:
                written.first_prev = row.prev_hash
            if fmt == "jsonl":
                emit(canonical_json({**body, "hash": row.hash}) + b"\n")
            else:
                emit(_csv_line(body, row.hash))
            written.head_hash, written.last_seq = row.hash, row.seq
            written.count += 1
    out.flush()
    return written


def _record_export(
    session: Session,
    manifest: dict[str, Any],
    *,
    low: int | None,
    actor: str,
    origin: str | None,
) -> AuditEvent:
    """Audit the export (``audit.export``) in the caller's transaction."""
    count, last_seq = manifest["count"], manifest["last_seq"]
    return record_event(
        session,
        actor=actor,
        action="audit.export",
        target=f"audit:{low}-{last_seq}" if count else "audit:empty",
        origin=origin,
        details={
            "format": manifest["file_format"],
            "count": count,
            "first_seq": manifest["first_seq"],
            "last_seq": last_seq,
            "file_sha256": manifest["file_sha256"],
            "since": manifest["since"],
            "until": manifest["until"],
        },
    )


def export_events(
    session: Session,
    *,
    fmt: ExportFormat,
    since: datetime | None,
    until: datetime | None,
    out: BinaryIO,
    actor: str,
    signing_key: Ed25519PrivateKey,
    origin: str | None = None,
) -> dict[str, Any]:
    """Write the events of a time window to ``out`` and return the signed manifest.

    The window is [``since``, ``until``) in event time (naive datetimes are UTC); every event
    between the first and the last one in it is exported, so the file is one contiguous piece
    of the chain. Lines are written as they are read (memory stays flat). The export itself is
    audited (``audit.export``, in the caller's transaction: commit it).

    Manifest fields: ``type`` (``moderation-audit-export/1``), ``file_format``,
    ``file_sha256``, ``file_bytes``, ``count``, ``first_seq``, ``last_seq``,
    ``first_prev_hash``, ``head_hash`` (hash of the last exported event), ``since``,
    ``until``, ``exported_at``, ``exported_by``, ``export_event_seq``, ``public_key`` and
    ``signature`` (Ed25519 over the rest; verify with :mod:`moderation.audit.offline`).

    Raises:
        ValueError: unknown ``fmt``.
        OSError: ``out`` cannot be written.
    """
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format must be 'jsonl' or 'csv', not {fmt!r}")
    low, high = _seq_range(session, since, until)
    written = _write_events(session, fmt, low, high, out)
    count, last_seq = written.count, written.last_seq
    manifest: dict[str, Any] = {
        "type": MANIFEST_TYPE,
        "file_format": fmt,
        "file_sha256": written.digest.hexdigest(),
        "file_bytes": written.size,
        "count": count,
        "first_seq": low if count else None,
        "last_seq": last_seq,
        "first_prev_hash": written.first_prev,
        "head_hash": written.head_hash,
        "since": _utc(since).isoformat() if since else None,
        "until": _utc(until).isoformat() if until else None,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "exported_by": actor,
    }
    manifest["export_event_seq"] = _record_export(
        session, manifest, low=low, actor=actor, origin=origin
    ).seq
    logger.info("audit export: %d events (%s) by %s", count, fmt, actor)
    return sign_document(manifest, signing_key)
