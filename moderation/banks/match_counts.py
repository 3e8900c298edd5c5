"""Daily match counts per entry (``entry_match_counts``), the input of flood control.

Kept apart from :mod:`moderation.banks.flood_control` so that recording a screening result
imports no encoder code.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Date, literal, select
from sqlalchemy.orm import Session

from moderation.storage.models import Entry, EntryMatchCount


def utc_today(now: datetime | None = None) -> date:
    """The current UTC day (the key of ``entry_match_counts``)."""
    return (now or datetime.now(UTC)).astimezone(UTC).date()


def count_matches(session: Session, entry_ids: Iterable[int], *, day: date, times: int = 1) -> None:
    """Add ``times`` (default one) to each entry's count for ``day`` (an upsert; entries deleted
    meanwhile skipped; an id given twice counts once).

    One ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` statement (SQLite >= 3.24 and
    PostgreSQL), so concurrent screenings add up instead of losing increments.
    """
    ids = sorted(set(entry_ids))
    if not ids:
        return
    # Imported here: ``sqlalchemy.dialects.postgresql`` loads every PostgreSQL driver's dialect
    # module (about 0.1 s), which a SQLite deployment's start-up need not pay.
    name = "postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"
    dialect: Any = importlib.import_module(f"sqlalchemy.dialects.{name}")
    rows = select(Entry.id, literal(day, Date), literal(times)).where(Entry.id.in_(ids))
    stmt = dialect.insert(EntryMatchCount).from_select(["entry_id", "day", "matches"], rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["entry_id", "day"],
        set_={"matches": EntryMatchCount.matches + stmt.excluded.matches},
    )
    session.execute(stmt)
