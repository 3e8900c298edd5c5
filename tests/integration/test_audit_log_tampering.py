"""RELIABILITY.md A1-A3: the audit log on SQLite and PostgreSQL is append-only, and edited,
deleted or inserted rows are reported where they are.

Tampering is done the way an attacker with the table owner's rights would: the append-only
triggers are dropped first, then rows are edited, deleted or inserted with plain SQL.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from moderation.audit.log import (
    compute_hash,
    record_event,
    write_checkpoint,
)
from moderation.audit.verify import verify_chain
from moderation.crypto.keys import KeyRing
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction
from moderation.storage.models import AuditEvent
from tests.conftest import (
    Db,
    unguard,
)

# --- A1 -------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a1_application_role_cannot_update_delete_or_truncate(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    migrate(engine)
    keyring = KeyRing.generate("a1")
    sessions = session_factory(engine)
    for i in range(3):
        with transaction(sessions) as session:
            record_event(session, actor="cli", action="test.write", details={"i": i})
    with transaction(sessions) as session:
        write_checkpoint(session, keyring)
    role = f"mod_app_{uuid.uuid4().hex[:8]}"
    dbname = postgres_url.rsplit("/", 1)[1]
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT CONNECT ON DATABASE {dbname} TO {role}"))
        privileges = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE"
        conn.execute(text(f"GRANT {privileges} ON ALL TABLES IN SCHEMA public TO {role}"))
    app = create_engine(postgres_url.replace("postgres@", f"{role}@"))
    try:
        guarded = "audit log is append-only"
        statements = [
            ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2", guarded),
            ("DELETE FROM audit_events WHERE seq = 3", guarded),
            ("TRUNCATE audit_events", guarded),
            ("UPDATE audit_checkpoints SET seq = 1", guarded),
            ("DELETE FROM audit_checkpoints", guarded),
            ("TRUNCATE audit_checkpoints", guarded),
            # The application role can neither drop the guard nor switch triggers off.
            ("DROP TRIGGER audit_events_append_only ON audit_events", "must be owner"),
            ("SET session_replication_role = replica", "permission denied"),
        ]
        for statement, expected in statements:
            with pytest.raises(DBAPIError, match=expected), app.begin() as conn:
                conn.execute(text(statement))
        # Appending still works for the application role.
        app_sessions = session_factory(app)
        with transaction(app_sessions) as session:
            record_event(session, actor="cli", action="test.after_attack")
    finally:
        app.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"REVOKE CONNECT ON DATABASE {dbname} FROM {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
    with sessions() as session:
        result = verify_chain(session, keyring=keyring)
    assert result.ok and result.count == 5, result  # 3 + key creation + the append after
    engine.dispose()


def test_sqlite_guard_rejects_update_and_delete(db: Db) -> None:
    db.events(3)
    for statement in (
        "UPDATE audit_events SET actor = 'mallory' WHERE seq = 2",
        "DELETE FROM audit_events WHERE seq = 3",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            db.execute(statement)
    assert db.verify().ok


# --- A2 -------------------------------------------------------------------------------------

EDITS: dict[str, Any] = {
    "actor": "user:666",
    "action": "bank.delete",
    "target": "bank:999",
    "origin": "198.51.100.66",
    "outcome": "denied",
    "details": {"forged": True},
    "prev_hash": "f" * 64,
    "hash": "e" * 64,
}


def forged_fields() -> dict[str, Any]:
    """An attacker's self-promotion event (time now), for rows inserted behind the log's back."""
    return {
        "ts": datetime.now(UTC),
        "actor": "user:666",
        "action": "user.role_change",
        "target": "user:666",
        "origin": "198.51.100.66",
        "outcome": "success",
        "details": {"role": "admin"},
    }


@pytest.mark.parametrize("field", [*EDITS, "ts"])
def test_a2_editing_one_field_of_row_k_is_reported_at_k(db: Db, field: str) -> None:
    db.events(8)
    assert db.verify().ok
    unguard(db)
    k = 5
    if field == "ts":
        with db.sessions() as session:
            ts = session.scalar(select(AuditEvent.ts).where(AuditEvent.seq == k))
        assert ts is not None
        value: Any = ts + timedelta(seconds=1)
    else:
        value = EDITS[field]
    with db.engine.begin() as conn:
        conn.execute(update(AuditEvent).where(AuditEvent.seq == k).values({field: value}))
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == k, result
    assert result.count == k - 1


def test_a2_cli_names_the_edited_row(
    db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moderation.cli import main

    db.events(6)
    key_file = tmp_path / "keys.json"
    db.keyring.save_file(key_file)
    for name in list(os.environ):
        if name.startswith("MODERATION_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODERATION_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MODERATION_DATABASE_URL", db.url)
    monkeypatch.setenv("MODERATION_KEY_FILE", str(key_file))
    (tmp_path / "var").mkdir()
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "OK: 7 events" in ok.output
    unguard(db)
    db.execute("UPDATE audit_events SET target = 'bank:2' WHERE seq = 4")
    bad = runner.invoke(main, ["audit", "verify"])
    assert bad.exit_code == 1
    assert "FAILED at seq 4" in bad.output
    as_json = runner.invoke(main, ["audit", "verify", "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout.splitlines()[0])["first_bad_seq"] == 4


# --- A3 and inserted rows -------------------------------------------------------------------


def test_a3_deleting_a_middle_row_is_detected(db: Db) -> None:
    db.events(8)
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq = 4")
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == 4
    assert "missing" in (result.problem or "")


def test_inserted_row_is_detected(db: Db) -> None:
    db.events(6)
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq = 7")
    with db.engine.begin() as conn:
        conn.execute(
            insert(AuditEvent).values(seq=7, **forged_fields(), prev_hash="0" * 64, hash="1" * 64)
        )
    result = db.verify()
    assert not result.ok and result.first_bad_seq == 7


def test_row_inserted_with_renumbering_breaks_the_next_link(db: Db) -> None:
    """A forged event squeezed in after seq 4, later events shifted up: the link to it breaks."""
    db.events(7)  # seqs 1..8
    unguard(db)
    with db.sessions() as session:
        prev = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == 4))
    assert prev is not None
    # Shift 5..8 to 6..9 (from the top, so the primary key never collides).
    for seq in range(8, 4, -1):
        db.execute("UPDATE audit_events SET seq = :new WHERE seq = :old", new=seq + 1, old=seq)
    forged = AuditEvent(seq=5, **forged_fields(), prev_hash=prev)
    from moderation.audit.log import event_body

    forged.hash = compute_hash(prev, event_body(forged))
    with transaction(db.sessions) as session:
        session.add(forged)
    result = db.verify()
    assert not result.ok
    # The forged row itself links correctly; the shifted one after it does not.
    assert result.first_bad_seq == 6
