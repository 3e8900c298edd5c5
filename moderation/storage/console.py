"""The console's own tables: background jobs, two-person approvals, server-side console sessions
and reviewers' daily exposure. Kept apart from :mod:`moderation.storage.models` (the domain's
tables), on the same declarative base; :mod:`moderation.storage` imports both so every table is
registered wherever storage is used.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from moderation.storage.models import Base, new_uuid, utcnow


class Job(Base):
    """A background job with progress (bank zip import, rebuild, erasure)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(50))
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    progress: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(200), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Approval(Base):
    """A two-person-rule request: one admin asks, a different admin approves."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    requested_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    approved_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|approved|rejected
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()


# --- admin console (issue 5) ---------------------------------------------------------------


class ConsoleSession(Base):
    """A server-side console session; deleting the row logs the session out everywhere.

    ``id`` is the SHA-256 of the cookie's random token, so the table alone cannot be replayed.
    """

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ReviewerExposure(Base):
    """How many review items (and reveals) one reviewer was shown on one UTC day."""

    __tablename__ = "reviewer_exposure"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    items: Mapped[int] = mapped_column(Integer, default=0)
    reveals: Mapped[int] = mapped_column(Integer, default=0)
