"""RELIABILITY.md G1, G3, G4 and G6, and issue 6's "done when": erasure by data subject.

On the world of ``tests/integration/conftest.py`` (SQLite and PostgreSQL), ``moderation gdpr
erase`` leaves nothing of the subject in any store, converges when killed halfway, and the
pseudonym of a subject met by two transactions at once is one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from moderation.audit.offline import RECEIPT_TYPE, load_public_key, verify_signature
from moderation.config import Settings
from moderation.crypto.errors import DecryptionError
from moderation.crypto.keys import KeyRing
from moderation.service.subjects import lookup_key, pseudonymize
from moderation.service.uploads import read_upload
from moderation.storage.db import migrate, transaction
from moderation.storage.models import (
    AuditEvent,
    ErasureRequest,
    Subject,
    Upload,
)
from tests.integration.conftest import (
    ALICE,
    REPO_ROOT,
    World,
    assert_bob_intact,
    assert_references_unresolvable,
    audit_verify_passes,
    best_cosines,
    receipt_public_key,
    run_cli,
    walk_blobs,
    walk_database,
    walk_every_store,
)

# --- G1 + done-when -------------------------------------------------------------------------


def _preview_then_erase(world: World, cli_env: pytest.MonkeyPatch) -> dict[str, Any]:
    """Preview, dry run and a refused erase (no ``--yes``) agree; the erasure's signed receipt
    counts what the preview planned and is recorded in the audit log and the request."""
    preview = run_cli(world, cli_env, "gdpr", "preview", "-", input=ALICE + "\n")
    assert preview.exit_code == 0, preview.output
    planned = json.loads(preview.stdout)
    dry = run_cli(world, cli_env, "gdpr", "erase", "-", "--dry-run", input=ALICE + "\n")
    assert json.loads(dry.stdout)["counts"] == planned
    refused = run_cli(world, cli_env, "gdpr", "erase", ALICE)
    assert refused.exit_code == 2  # no --yes

    result = run_cli(world, cli_env, "gdpr", "erase", ALICE, "--yes")
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout)
    counts = receipt["counts"]
    assert counts == {k: v for k, v in planned.items() if k != "held_uploads"}
    assert counts["uploads"] == 2 and counts["blobs"] == 2 and counts["data_keys"] == 2
    assert counts["screenings"] == 2 and counts["matches"] >= 1
    assert counts["review_items"] == 1 and counts["labelled_pairs"] == 1
    assert counts["decisions"] >= counts["screenings"]  # statements of reasons go too
    assert counts["callback_attempts"] == 1 and counts["bank_entries"] == 1
    assert counts["subject_secrets"] == 1
    assert "redis_keys" not in counts  # the service keeps nothing per upload in Redis
    assert receipt["held"]["uploads"] == 0
    key = load_public_key(receipt_public_key(world))
    assert verify_signature(receipt, key, expected_type=RECEIPT_TYPE) is None
    with world.runtime.sessions() as session:
        event = session.get(AuditEvent, receipt["audit_seq"])
        assert event is not None and event.action == "gdpr.erase"
        assert event.details["counts"] == counts
        request = session.get(ErasureRequest, receipt["request_id"])
        assert request is not None and request.state == "done" and request.receipt == receipt

    return receipt


def _assert_backup_useless(world: World, backup: Path) -> None:
    """G4: a copy of the blob directory taken before the erasure is useless now."""
    with world.runtime.sessions() as session:
        assert session.get(Upload, world.alice["coffee"]) is None  # row and wrapped key gone
    copied = next(backup.rglob(f"{world.alice['coffee']}*")).read_bytes()
    assert world.images["coffee"].read_bytes()[:4096] not in copied
    ring = world.runtime.keyring
    from moderation.crypto.aead import decrypt

    for key_id in ring.key_ids:  # not even a master key opens it: the data key is destroyed
        with pytest.raises(DecryptionError):
            decrypt(copied, ring.get(key_id), b"moderation/blob/v1\x00", context="backup")


@pytest.mark.redis
@pytest.mark.slow
def test_g1_erasure_leaves_nothing_in_any_store(
    make_world: Callable[..., World],
    tmp_path: Path,
    cli_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="moderation")
    world = make_world(hold=False)
    before = best_cosines(world)
    # Exported before the erasure (G1: "screened, reviewed, exported").
    exported = run_cli(
        world, cli_env, "audit", "export", "--format", "jsonl", "--out", str(tmp_path / "a.jsonl")
    )
    assert exported.exit_code == 0, exported.output
    backup = tmp_path / "blobs-backup"
    shutil.copytree(world.settings.blobs_dir, backup)
    # The walks do find the subject before the erasure.
    for walk in (walk_database, walk_blobs):
        with pytest.raises(AssertionError):
            walk(world)

    receipt = _preview_then_erase(world, cli_env)
    walk_every_store(world, before, caplog)
    assert_references_unresolvable(world)
    assert_bob_intact(world)
    audit_verify_passes(world, cli_env)

    _assert_backup_useless(world, backup)

    # Idempotent: erasing again finds nothing and changes nothing.
    again = run_cli(world, cli_env, "gdpr", "erase", ALICE, "--yes")
    assert again.exit_code == 0
    second = json.loads(again.stdout)
    assert not second["subject_known"] and not any(second["counts"].values())
    audit_verify_passes(world, cli_env)
    offline = run_cli(
        world, cli_env, "audit", "verify-receipt", str(_write(tmp_path / "r.json", receipt))
    )
    assert offline.exit_code == 0, offline.output


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


# --- G3 -------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
import moderation.governance.gdpr as gdpr

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[1]
if point == "after_rows":
    gdpr.delete_blob_files = die
elif point == "in_rows_txn":
    original = gdpr.delete_upload_rows
    def deleting_then_dying(session, ids, counts):
        original(session, ids, counts)
        session.flush()
        die()
    gdpr.delete_upload_rows = deleting_then_dying
from moderation.cli import main
sys.argv = ["moderation", "gdpr", "erase", "-", "--yes"]
main()
"""


@pytest.mark.redis
@pytest.mark.slow
# Killed inside the database transaction (after bank entries went), and between
# that transaction's commit and the blob files' deletion.
@pytest.mark.parametrize("point", ["in_rows_txn", "after_rows"])
def test_g3_erasure_killed_halfway_converges_on_rerun(
    make_world: Callable[..., World],
    cli_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    point: str,
) -> None:
    from moderation.governance.erasure_requests import list_requests, overdue_requests
    from moderation.governance.gdpr import preview_erasure

    caplog.set_level(logging.DEBUG, logger="moderation")
    world = make_world(hold=False)
    before = best_cosines(world)
    planned = preview_erasure(world.runtime, ALICE)
    env = {**os.environ, **world.env, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, point],
        input=ALICE + "\n",
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ALICE not in proc.stderr and ALICE not in proc.stdout

    # No half-erased state: alice's uploads are either all there and readable, or all gone.
    with world.runtime.sessions() as session:
        rows = [session.get(Upload, uid) for uid in world.erased_ids]
        present = [r for r in rows if r is not None]
        assert len(present) in (0, len(rows)), point
        for upload in present:
            read_upload(upload, keyring=world.runtime.keyring, blobs_dir=world.settings.blobs_dir)
        assert (len(present) == 0) == (point == "after_rows")
        (request,) = list_requests(session)
        assert request["state"] == "running" and request["completed_at"] is None
        overdue = overdue_requests(session, days=0)
        assert [r["id"] for r in overdue] == [request["id"]]

    rerun = run_cli(world, cli_env, "gdpr", "erase", ALICE, "--yes")
    assert rerun.exit_code == 0, rerun.output
    receipt = json.loads(rerun.stdout)
    assert receipt["request_id"] == request["id"]  # the same request, resumed
    assert receipt["counts"] == {k: v for k, v in planned.items() if k != "held_uploads"}
    with world.runtime.sessions() as session:
        assert overdue_requests(session, days=0) == []
    walk_every_store(world, before, caplog)
    assert_bob_intact(world)
    audit_verify_passes(world, cli_env)


# --- pseudonyms under concurrency ------------------------------------------------------------


@pytest.mark.postgres
def test_concurrent_first_sight_of_a_subject_gives_one_pseudonym(
    postgres_url: str, settings: Settings
) -> None:
    """Two transactions meet a new subject at once: the insert loser reuses the winner's row."""
    import threading

    from moderation.storage.db import create_db_engine, session_factory

    engine = create_db_engine(postgres_url)
    migrate(engine)
    sessions = session_factory(engine)
    keyring = KeyRing.generate("race")
    with transaction(sessions) as session:
        lookup_key(session, keyring, "warm-up")  # create the deployment lookup secret first
    refs: dict[str, str] = {}
    errors: list[BaseException] = []
    a_inserted = threading.Event()

    def first() -> None:
        try:
            with transaction(sessions) as session:
                refs["a"] = pseudonymize(session, keyring, ALICE)
                a_inserted.set()
                # Commit only once the second transaction waits on our uncommitted row.
                deadline = time.monotonic() + 60
                waiting = 0
                while not waiting and time.monotonic() < deadline:
                    time.sleep(0.05)
                    # Another connection: pg_stat_activity is frozen within a transaction.
                    with engine.connect() as probe:
                        waiting = probe.scalar(
                            text(
                                "SELECT count(*) FROM pg_stat_activity "
                                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                            )
                        )
                assert waiting, "the second transaction never waited on the first"
        except BaseException as exc:
            errors.append(exc)

    def second() -> None:
        try:
            a_inserted.wait(60)
            with transaction(sessions) as session:
                refs["b"] = pseudonymize(session, keyring, ALICE)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert refs["a"] == refs["b"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Subject)) == 1
    engine.dispose()
