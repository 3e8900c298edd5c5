"""Statements of reasons and appeals (issue 14): one row per decision on an upload with its EU
DSA Art. 17 fields, and the platforms' appeals of decisions. Same declarative base as
:mod:`moderation.storage.models`; :mod:`moderation.storage` imports every model module.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from moderation.storage.models import Base, new_uuid, utcnow


class Decision(Base):
    """One decision on an upload with its statement of reasons (EU DSA Art. 17): the
    screening's, a reviewer's, an appeal's. The newest row is the upload's current decision.

    ``decision_ground`` is ``illegal_content`` or ``incompatible_with_terms`` (the category's
    policy) for a restriction (``block``), None when nothing was restricted.
    """

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # screening | review | appeal
    decision: Mapped[str] = mapped_column(String(16))  # allow | review | block | unscannable
    decision_ground: Mapped[str | None] = mapped_column(String(40))
    automated_detection: Mapped[bool] = mapped_column(Boolean)
    automated_decision: Mapped[bool] = mapped_column(Boolean)
    content_type: Mapped[str] = mapped_column(String(32), default="image")
    category: Mapped[str | None] = mapped_column(String(100))
    policy: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(String(200))
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Appeal(Base):
    """A platform's appeal of one decision, settled by a reviewer other than its decider.

    ``state``: open | claimed | decided; ``outcome``: upheld | overturned. One appeal per
    decision (``decision_id`` unique).
    """

    __tablename__ = "appeals"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id", ondelete="SET NULL"))
    decision_id: Mapped[int] = mapped_column(
        ForeignKey("decisions.id", ondelete="CASCADE"), unique=True
    )
    reason: Mapped[str] = mapped_column(Text)
    original_decision: Mapped[str] = mapped_column(String(16))
    # The person who made the appealed decision (None: automated): never the appeal's reviewer.
    original_decided_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    lease_until: Mapped[datetime | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(16))
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    decided_at: Mapped[datetime | None] = mapped_column()
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
