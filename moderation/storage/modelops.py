"""Model-operations tables (issue 18): the golden set of the canary, canary runs and drift
runs (:mod:`moderation.modelops`). Same declarative base as :mod:`moderation.storage.models`;
:mod:`moderation.storage` imports every model module.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from moderation.storage.models import Base, new_uuid, utcnow


class CanaryItem(Base):
    """One labelled image of the golden set (``moderation.matching.golden``): its pixels are a
    blob under ``<data_dir>/canary`` sealed with its own data key (``wrapped_key``), so deleting
    the row (the entry it was made from is removed: ON DELETE CASCADE) crypto-shreds it."""

    __tablename__ = "canary_items"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    origin: Mapped[str] = mapped_column(String(20))  # import | operator
    label: Mapped[str] = mapped_column(String(10), index=True)  # match | no-match
    entry_id: Mapped[int | None] = mapped_column(
        ForeignKey("entries.id", ondelete="CASCADE"), index=True
    )
    bank_id: Mapped[int | None] = mapped_column(ForeignKey("banks.id", ondelete="CASCADE"))
    edit: Mapped[str] = mapped_column(String(40), default="")
    blob_ref: Mapped[str] = mapped_column(String(200))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    added_by: Mapped[str] = mapped_column(String(200), default="cli")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CanaryRun(Base):
    """One canary run's figures (``moderation.modelops.canary``); the latest per encoder is
    exported as Prometheus gauges."""

    __tablename__ = "canary_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    reason: Mapped[str] = mapped_column(String(100))
    encoder_id: Mapped[str] = mapped_column(String(500), index=True)
    # SHA-256 of (snapshot version, classifier version, policy, encoder): what was measured.
    fingerprint: Mapped[str] = mapped_column(String(64))
    figures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    passed_slo: Mapped[bool] = mapped_column(Boolean, default=True)


class DriftRun(Base):
    """One drift check of one signal (``moderation.modelops.drift``): score in [0, 1]."""

    __tablename__ = "drift_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    signal: Mapped[str] = mapped_column(String(100), index=True)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
