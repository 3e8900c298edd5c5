"""Engine, sessions and schema migrations (Alembic) for SQLite and PostgreSQL."""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers work while one writer commits; foreign keys are off by default in SQLite;
    # busy_timeout makes concurrent writers wait instead of failing at once.
    # isolation_level=None hands transaction control to SQLAlchemy's "begin" hook below
    # (SQLAlchemy docs, "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


#: How long a statement waits for SQLite's locks before "database is locked", ms.
BUSY_TIMEOUT_MS = 30_000

#: Longest pause between two tries for the write lock in :func:`_begin_immediate`, s.
LOCK_POLL_MAX = 0.02


def _begin_immediate(dbapi_connection: Any) -> None:
    """``BEGIN IMMEDIATE``, waiting for the write lock in Python rather than in SQLite's busy
    handler: the handler sleeps inside the C call, which under gevent (``moderation serve``)
    stops every greenlet of the process, liveness probe included, for as long as the worker
    holds the lock; ``time.sleep`` yields (and in a thread just sleeps). Tries with doubling
    pauses from 1 ms to :data:`LOCK_POLL_MAX` for up to :data:`BUSY_TIMEOUT_MS`.

    Raises:
        sqlite3.OperationalError: the lock was not free within the busy timeout.
    """
    import sqlite3
    import time

    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_MAX)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


#: Connection execution option that :func:`transaction` sets: its SQLite transaction takes the
#: write lock at ``BEGIN`` (``BEGIN IMMEDIATE``); every other session begins ``DEFERRED``.
WRITE_INTENT = "moderation_write_intent"


def _sqlite_begin(connection: Any) -> None:
    # A deferred SQLite transaction that reads and then writes fails with SQLITE_BUSY when another
    # writer committed in between (busy_timeout cannot help). Taking the write lock at BEGIN makes
    # read-modify-write sequences (the audit hash chain, snapshot versions, review claims) atomic,
    # so transaction() (every write) begins IMMEDIATE. A plain session only reads: it begins
    # DEFERRED and, in WAL mode, reads its snapshot without waiting for a writer
    # (https://www.sqlite.org/lang_transaction.html, https://www.sqlite.org/wal.html).
    if connection.get_execution_options().get(WRITE_INTENT):
        _begin_immediate(connection.connection.dbapi_connection)
    else:
        connection.exec_driver_sql("BEGIN")


#: Connections a PostgreSQL engine may open past its ``pool_size`` under a peak (closed again
#: when returned: each costs a new connection and authentication).
POOL_OVERFLOW = 8


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``);
    ``kwargs`` go to SQLAlchemy's ``create_engine`` (``pool_size`` applies to PostgreSQL only).

    ``postgresql://`` URLs are mapped to the psycopg 3 driver.
    """
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        kwargs.pop("pool_size", None)  # SQLite: SQLAlchemy's own pool choice per file/memory
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("max_overflow", POOL_OVERFLOW)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A ``sessionmaker`` that keeps loaded attributes after commit.

    Its plain sessions are for reads: on SQLite they begin ``DEFERRED`` and take no write lock,
    so a read never queues behind a writer. Write with :func:`transaction`.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error.

    On SQLite it begins ``BEGIN IMMEDIATE`` (the database write lock, waited for up to the
    30 s busy timeout), so concurrent writers serialise instead of failing with SQLITE_BUSY
    when a deferred read would upgrade to a write.
    """
    with factory() as session, session.begin():
        # Procures the connection now, with the option the "begin" hook reads (SQLite only;
        # other dialects ignore it).
        session.connection(execution_options={WRITE_INTENT: True})
        yield session


def _alembic_config(engine: Engine, attributes: Mapping[str, Any] | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes.update(attributes or {})
    config.attributes["engine"] = engine
    return config


def migrate(
    engine: Engine, revision: str = "heads", *, attributes: Mapping[str, Any] | None = None
) -> None:
    """Upgrade the schema to ``revision`` (default: every head) with Alembic (idempotent).

    ``attributes``: hooks for data migrations that need keys the storage layer cannot reach
    (``moderation.banks.sealed_fields.migration_attributes``); a migration that needs one
    and lacks it refuses to run on a database holding data.
    """
    from alembic import command

    command.upgrade(_alembic_config(engine, attributes), revision)


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the newest Alembic revision.

    The scripts' heads come from :func:`script_heads` (the migration files read as text, no
    Alembic import: Alembic costs about 0.2 s of every command's start-up), the database's from
    its ``alembic_version`` table; Alembic itself is asked only when a script cannot be read
    that way.
    """
    heads = script_heads()
    if heads is None:
        from alembic.script import ScriptDirectory

        heads = frozenset(ScriptDirectory.from_config(_alembic_config(engine)).get_heads())
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        current = {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
    return current == set(heads)


_REVISION_LINE = re.compile(r"^(revision|down_revision)\b[^=\n]*=\s*(.+?)\s*$", re.MULTILINE)


@lru_cache(maxsize=1)
def script_heads() -> frozenset[str] | None:
    """The head revisions of ``migrations/versions`` (revisions no other script names as its
    ``down_revision``), from each file's module-level ``revision = "..."`` and
    ``down_revision = ... `` lines (a string, None, or a tuple of strings for a merge, as
    Alembic's script template writes them); None when a file has no such literal lines, so the
    caller falls back to Alembic's own parser."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found = dict(_REVISION_LINE.findall(path.read_text(encoding="utf-8")))
        try:
            revision = ast.literal_eval(found["revision"])
            down = ast.literal_eval(found["down_revision"])
        except (KeyError, ValueError, SyntaxError):
            return None
        down = (down,) if isinstance(down, str) else tuple(down or ())
        if not isinstance(revision, str) or not all(isinstance(d, str) for d in down):
            return None
        revisions.add(revision)
        parents.update(down)
    return frozenset(revisions - parents) or None
