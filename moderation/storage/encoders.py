"""Encoder operations' tables: the originals vault, encoder migrations and shadow decisions.

Kept apart from :mod:`moderation.storage.models` on the same declarative base (imported by
:mod:`moderation.storage` so every table is registered).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from moderation.storage.models import Base, new_uuid, utcnow


class EntryOriginal(Base):
    """An entry's original image, sealed under its own data key (``moderation.banks.originals``).

    The blob file holds ciphertext only; deleting this row destroys the wrapped data key, which
    crypto-shreds every copy of the blob (backups included).
    """

    __tablename__ = "entry_originals"

    entry_id: Mapped[int] = mapped_column(
        ForeignKey("entries.id", ondelete="CASCADE"), primary_key=True
    )
    blob_ref: Mapped[str] = mapped_column(String(200))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EncoderMigration(Base):
    """One blue-green encoder migration: ``source`` serves until promotion, ``target`` shadows.

    ``state``: ``running`` (the job embeds originals), ``ready`` (target snapshots complete,
    shadow screening continues), ``promoted`` (target serves; source snapshots kept for
    rollback), ``rolled_back`` (source serves again), ``cancelled``, ``failed``.
    """

    __tablename__ = "encoder_migrations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    source_name: Mapped[str] = mapped_column(String(500))
    source_id: Mapped[str] = mapped_column(String(500))
    target_name: Mapped[str] = mapped_column(String(500))
    target_id: Mapped[str | None] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    without_originals: Mapped[int] = mapped_column(Integer, default=0)
    embed_seconds: Mapped[float | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(String(1000))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column()
    rolled_back_at: Mapped[datetime | None] = mapped_column()


class ShadowDecision(Base):
    """One upload screened by a migration's target encoder beside the serving one."""

    __tablename__ = "shadow_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    migration_id: Mapped[str] = mapped_column(
        ForeignKey("encoder_migrations.id", ondelete="CASCADE"), index=True
    )
    upload_id: Mapped[str] = mapped_column(String(32), index=True)
    # The bank category of the serving (else the shadow) decision's match; "none" without one.
    category: Mapped[str] = mapped_column(String(100), default="none")
    decision: Mapped[str] = mapped_column(String(16))
    shadow_decision: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


__all__ = ["EncoderMigration", "EntryOriginal", "ShadowDecision", "new_uuid"]
