"""Tenancy tables (issue 14): which API clients a bank is shared with
(:mod:`moderation.banks.tenancy`). Same declarative base as :mod:`moderation.storage.models`;
:mod:`moderation.storage` imports every model module.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from moderation.storage.models import Base, utcnow


class BankShare(Base):
    """A bank shared with one API client: it matches that client's uploads and is named to it."""

    __tablename__ = "bank_shares"

    bank_id: Mapped[int] = mapped_column(
        ForeignKey("banks.id", ondelete="CASCADE"), primary_key=True
    )
    client_id: Mapped[int] = mapped_column(
        ForeignKey("api_clients.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
