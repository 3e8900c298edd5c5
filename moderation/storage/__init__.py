"""Persistence: SQLAlchemy models, repositories and Alembic migrations."""

from moderation.storage import (  # noqa: F401 - every table on Base.metadata
    console,
    decisions,
    encoders,
    modelops,
    models,
    tenancy,
)
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction

__all__ = ["create_db_engine", "migrate", "session_factory", "transaction"]
