"""Alembic environment: runs against the engine handed over by ``moderation.storage.db``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from moderation.storage.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _sqlite_foreign_keys(connection, on=False)
        try:
            with connection.begin():
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=sqlite,
                )
                context.run_migrations()
                if sqlite:
                    _sqlite_foreign_key_check(connection)
        finally:
            if sqlite:
                _sqlite_foreign_keys(connection, on=True)


def _sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    """Switch SQLite's foreign-key enforcement, outside any transaction (inside one the pragma
    is a no-op). Off while migrating: a batch migration recreates a table (copy, drop, rename),
    and dropping a table that others reference with ``ON DELETE CASCADE`` would delete their
    rows (SQLite docs, "ALTER TABLE", the 12-step procedure, step 1)."""
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _sqlite_foreign_key_check(connection: Connection) -> None:
    """Refuse (roll the migration back) when it left a dangling reference (step 10 of the same
    procedure)."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"the migration left dangling foreign keys: {broken[:5]}")


run_migrations()
