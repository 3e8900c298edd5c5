"""Persistence: SQLAlchemy models, repositories and Alembic migrations."""

from moderation.storage import console, decisions, models  # noqa: F401 - every table on Base.metadata
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction

__all__ = ["create_db_engine", "migrate", "session_factory", "transaction"]
