"""RELIABILITY.md A1-A5 and A7: the audit log on SQLite and PostgreSQL.

Tampering is done the way an attacker with the table owner's rights would: the append-only
triggers are dropped first, then rows are edited, deleted or inserted with plain SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, create_engine, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.export import export_events
from moderation.audit.log import (
    compute_hash,
    public_key_hex,
    record_event,
    sign_document,
    signing_key,
    write_checkpoint,
)
from moderation.audit.offline import CHECKPOINT_TYPE, load_public_key, verify_export
from moderation.audit.verify import verify_chain
from moderation.crypto.keys import KeyRing
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction
from moderation.storage.models import AuditCheckpoint, AuditEvent

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Db:
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    keyring: KeyRing

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def events(self, n: int, *, start: int = 0) -> None:
        for i in range(start, start + n):
            with transaction(self.sessions) as session:
                record_event(
                    session,
                    actor=f"user:{i % 3}",
                    action="test.write",
                    target=f"thing:{i}",
                    origin="203.0.113.7",
                    details={"i": i, "ratio": i / 7, "note": "naïve ✓"},
                )

    def checkpoint(self) -> AuditCheckpoint | None:
        with transaction(self.sessions) as session:
            return write_checkpoint(session, self.keyring)

    def verify(self, **kwargs: Any) -> Any:
        with self.sessions() as session:
            return verify_chain(session, keyring=self.keyring, **kwargs)

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)


def unguard(db: Db) -> None:
    """Drop the append-only triggers (an attacker who owns the tables can)."""
    for table in ("audit_events", "audit_checkpoints"):
        if db.dialect == "postgresql":
            db.execute(f"DROP TRIGGER {table}_append_only ON {table}")
            db.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        else:
            db.execute(f"DROP TRIGGER {table}_no_update")
            db.execute(f"DROP TRIGGER {table}_no_delete")


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    engine = create_db_engine(database_url)
    migrate(engine)
    keyring = KeyRing.generate("audit-test")
    handle = Db(database_url, engine, session_factory(engine), keyring)
    with transaction(handle.sessions) as session:
        signing_key(session, keyring, create=True, actor="cli")  # event 1
    yield handle
    engine.dispose()


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


# --- A4 and checkpoints ---------------------------------------------------------------------


def test_a4_truncated_tail_is_detected_against_the_last_checkpoint(db: Db) -> None:
    db.events(9)  # seqs 1..10
    checkpoint = db.checkpoint()
    assert checkpoint is not None and checkpoint.seq == 10
    assert db.verify().ok
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq >= 8")
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == 8
    assert "truncated" in (result.problem or "")
    assert result.count == 7


def test_a4_tail_after_the_last_checkpoint_is_the_undetectable_window(db: Db) -> None:
    db.events(4)
    db.checkpoint()  # seq 5
    db.events(3, start=4)
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq > 5")
    assert db.verify().ok  # hence periodic checkpoints (audit_checkpoint_every)


def test_rewritten_chain_is_caught_by_the_checkpoint(db: Db) -> None:
    """Editing row 3 and recomputing every later hash fools the chain, not the signature."""
    db.events(6)
    db.checkpoint()  # seq 7
    unguard(db)
    from moderation.audit.log import event_body

    with transaction(db.sessions) as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        prev = rows[1].hash
        for row in rows[2:]:
            if row.seq == 3:
                row.actor = "user:666"
            row.prev_hash = prev
            row.hash = compute_hash(prev, event_body(row))
            prev = row.hash
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == 1  # no earlier checkpoint vouches for anything before seq 7
    assert "rewritten" in (result.problem or "")


def test_resigned_checkpoints_fail_under_the_pinned_key(db: Db) -> None:
    db.events(6)
    db.checkpoint()
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq >= 5")
    db.execute("DELETE FROM audit_checkpoints")
    # The attacker signs a checkpoint for the truncated head with a key of their own.
    attacker = Ed25519PrivateKey.generate()
    with db.sessions() as session:
        head = session.execute(
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        ).one()
    signed = sign_document(
        {"type": CHECKPOINT_TYPE, "seq": head.seq, "head_hash": head.hash}, attacker
    )
    with transaction(db.sessions) as session:
        session.add(
            AuditCheckpoint(
                seq=head.seq,
                head_hash=head.hash,
                signature=signed["signature"],
                public_key=signed["public_key"],
            )
        )
    pinned = db.verify()
    assert not pinned.ok and pinned.key_pinned
    assert "signature does not verify" in (pinned.problem or "")
    with db.sessions() as session:
        unpinned = verify_chain(session)  # trusts the key stored beside the checkpoint
    assert unpinned.ok and not unpinned.key_pinned


def test_deleted_signing_key_with_checkpoints_fails(db: Db) -> None:
    db.events(3)
    db.checkpoint()
    db.execute("DELETE FROM deployment_secrets WHERE name = 'audit-signing-key'")
    result = db.verify()
    assert not result.ok and "signing key is missing" in (result.problem or "")


def test_checkpoint_is_written_once_per_head(db: Db) -> None:
    from moderation.audit.log import checkpoint_if_due

    db.events(3)
    assert db.checkpoint() is not None
    assert db.checkpoint() is None  # head unchanged
    db.events(2, start=3)
    with transaction(db.sessions) as session:
        assert checkpoint_if_due(session, db.keyring, every=3) is None
    db.events(1, start=5)
    with transaction(db.sessions) as session:
        due = checkpoint_if_due(session, db.keyring, every=3)
        assert due is not None and due.seq == 7
    result = db.verify()
    assert result.ok and result.checkpoints == 2


# --- A5 -------------------------------------------------------------------------------------

WRITER = """
import sys
from moderation.audit.log import record_event
from moderation.storage.db import create_db_engine, session_factory, transaction
url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = create_db_engine(url)
sessions = session_factory(engine)
for i in range(n):
    with transaction(sessions) as session:
        record_event(session, actor="worker", action="test.concurrent", details={"w": name, "i": i})
engine.dispose()
"""


def test_a5_concurrent_threads_and_processes_make_one_linear_chain(db: Db) -> None:
    per_writer, threads, processes = 20, 4, 2
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db.url, f"p{p}", str(per_writer)],
            env=env,
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            for i in range(per_writer):
                with transaction(db.sessions) as session:
                    record_event(
                        session,
                        actor="worker",
                        action="test.concurrent",
                        details={"w": name, "i": i},
                    )
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(f"t{t}",)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    assert not errors, errors
    with db.sessions() as session:
        rows = session.execute(
            select(AuditEvent.seq, AuditEvent.details)
            .where(AuditEvent.action == "test.concurrent")
            .order_by(AuditEvent.seq)
        ).all()
        seqs = list(session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)))
    writers = {f"t{t}" for t in range(threads)} | {f"p{p}" for p in range(processes)}
    assert {(r.details["w"], r.details["i"]) for r in rows} == {
        (w, i) for w in writers for i in range(per_writer)
    }
    total = 1 + per_writer * (threads + processes)
    assert seqs == list(range(1, total + 1))
    result = db.verify()
    assert result.ok and result.count == total


# --- A7: exports ----------------------------------------------------------------------------


def _export(db: Db, fmt: str, **window: Any) -> tuple[bytes, dict[str, Any]]:
    buffer = BytesIO()
    with transaction(db.sessions) as session:
        key = signing_key(session, db.keyring)
        manifest = export_events(
            session,
            fmt="csv" if fmt == "csv" else "jsonl",
            since=window.get("since"),
            until=window.get("until"),
            out=buffer,
            actor="user:7",
            signing_key=key,
        )
    return buffer.getvalue(), manifest


def _public_key(db: Db) -> str:
    with db.sessions() as session:
        return public_key_hex(signing_key(session, db.keyring))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a7_export_verifies_and_one_edited_line_fails_on_that_line(db: Db, fmt: str) -> None:
    db.events(6)
    with transaction(db.sessions) as session:  # formula-looking and quoted cells round-trip
        record_event(
            session,
            actor="=cmd|' /C calc'!A0",
            action="test.csv",
            target='a "quoted", target',
            origin="-1+1",
            details={"text": "line\nbreak"},
        )
    data, manifest = _export(db, fmt)
    key = load_public_key(_public_key(db))
    assert manifest["count"] == 8 and manifest["first_seq"] == 1 and manifest["last_seq"] == 8
    check = verify_export(data, manifest, key)
    assert check.ok and check.count == 8, check
    if fmt == "csv":  # spreadsheet formulas are neutralised, and still verify
        assert b"'=cmd|" in data and b",'-1+1," in data
    # The export is itself audited.
    with db.sessions() as session:
        event = session.get(AuditEvent, manifest["export_event_seq"])
    assert event is not None and event.action == "audit.export" and event.actor == "user:7"
    assert event.details["file_sha256"] == manifest["file_sha256"]

    lines = data.decode("utf-8").splitlines(keepends=True)
    header = 1 if fmt == "csv" else 0
    target_line = header + 5  # thing:3 is seq 5 (seq 1 created the signing key)
    edited = lines[target_line - 1].replace("thing:3", "thing:9")
    assert edited != lines[target_line - 1]
    tampered = "".join([*lines[: target_line - 1], edited, *lines[target_line:]]).encode()
    check = verify_export(tampered, manifest, key)
    assert not check.ok
    assert check.line == target_line
    assert "hash mismatch" in (check.problem or "")


def test_a7_rehashed_edit_fails_at_the_next_link(db: Db) -> None:
    db.events(5)
    data, manifest = _export(db, "jsonl")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    lines[2]["actor"] = "user:666"
    body = {k: v for k, v in lines[2].items() if k != "hash"}
    lines[2]["hash"] = compute_hash(body["prev_hash"], body)
    from moderation.audit.offline import canonical_json

    tampered = b"".join(canonical_json(line) + b"\n" for line in lines)
    check = verify_export(tampered, manifest, load_public_key(_public_key(db)))
    assert not check.ok and check.line == 4


def test_a7_dropped_lines_wrong_key_and_window(db: Db) -> None:
    db.events(6)
    data, manifest = _export(db, "jsonl")
    key = load_public_key(_public_key(db))
    without_last = b"".join(data.splitlines(keepends=True)[:-1])
    assert not verify_export(without_last, manifest, key).ok
    without_middle = b"".join(
        line for i, line in enumerate(data.splitlines(keepends=True)) if i != 2
    )
    check = verify_export(without_middle, manifest, key)
    assert not check.ok and check.line == 3
    other = Ed25519PrivateKey.generate().public_key()
    check = verify_export(data, manifest, other)
    assert not check.ok and "signature" in (check.problem or "")
    forged = {**manifest, "count": 2}
    assert not verify_export(data, forged, key).ok
    # A time window exports one contiguous piece of the chain.
    with db.sessions() as session:
        ts = dict(session.execute(select(AuditEvent.seq, AuditEvent.ts)).all())
    part, part_manifest = _export(db, "csv", since=ts[3], until=ts[6])
    assert (part_manifest["first_seq"], part_manifest["last_seq"]) == (3, 5)
    assert verify_export(part, part_manifest, key).ok
    empty, empty_manifest = _export(db, "jsonl", since=datetime.now(UTC) + timedelta(days=1))
    assert empty == b"" and empty_manifest["count"] == 0
    assert verify_export(empty, empty_manifest, key).ok
    assert db.verify().ok  # the exports' own audit events kept the chain intact


def test_a7_offline_script_needs_nothing_but_cryptography(db: Db, tmp_path: Path) -> None:
    """The verifier file runs on its own (isolated mode, outside the repository)."""
    import shutil

    db.events(4)
    data, manifest = _export(db, "csv")
    (tmp_path / "export.csv").write_bytes(data)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    script = tmp_path / "verify_audit_export.py"
    shutil.copy(REPO_ROOT / "moderation" / "audit" / "offline.py", script)
    key = _public_key(db)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-I", str(script), *args, "--public-key", key],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = run("export.csv", "manifest.json")
    assert ok.returncode == 0, ok.stderr
    assert "OK: 5 events" in ok.stdout
    tampered = data.replace(b"thing:2", b"thing:7")
    (tmp_path / "export.csv").write_bytes(tampered)
    bad = run("export.csv", "manifest.json")
    assert bad.returncode == 1
    assert "FAILED at line 5" in bad.stderr  # header, then seq 1..; thing:2 is seq 4
