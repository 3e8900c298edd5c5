"""RELIABILITY.md A5: concurrent threads and processes make one linear audit chain."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import select

from moderation.audit.log import (
    record_event,
)
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent
from tests.conftest import (
    Db,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
