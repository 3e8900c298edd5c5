"""RELIABILITY.md G1-G6 and A6, and issue 6's "done when": erasure by data subject.

Each test builds a small world on SQLite and on PostgreSQL: two banks (one in a category under
legal hold), a data subject ("alice") and another ("bob") whose photos were screened with the
real encoder, a bank entry made from one of alice's uploads, review items, labelled pairs,
callback attempts and the per-upload Redis keys of the pinned naming, in a Redis server this
module starts on a spare port. After ``moderation gdpr erase`` it walks every store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import redis
import yaml
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from moderation.audit.log import public_key_hex, signing_key
from moderation.audit.offline import RECEIPT_TYPE, load_public_key, verify_signature
from moderation.audit.verify import verify_chain
from moderation.banks.operations import import_bank, set_bank_enabled
from moderation.banks.versions import current_snapshot, read_payload
from moderation.benchmark.queue import start_redis_server
from moderation.config import Settings, load_settings
from moderation.crypto.errors import DecryptionError
from moderation.crypto.keys import KeyRing
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.subjects import find_subject, lookup_key, pseudonymize
from moderation.service.uploads import read_upload
from moderation.storage.db import migrate, transaction
from moderation.storage.models import (
    AuditEvent,
    CallbackAttempt,
    Entry,
    ErasureRequest,
    LabelledPair,
    ReviewItem,
    Subject,
    Upload,
)
from tests.conftest import skimage_photo

REPO_ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice.subject-4711@example.com"
BOB = "bob.subject-0815@example.org"
HOLD_BASIS = "18 U.S.C. 2258A (as amended 2024)"


# --- services -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a spare port (no persistence), stopped after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = start_redis_server(port, workdir, binary)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.1)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=30)


# --- the world ------------------------------------------------------------------------------


@dataclass
class World:
    runtime: Runtime
    settings: Settings
    env: dict[str, str]
    images: dict[str, Path]
    alice: dict[str, str]  # image name -> upload id
    bob: dict[str, str]
    held: str | None  # alice's upload under legal hold
    ref: str
    lookup: str
    vectors: dict[str, npt.NDArray[np.float32]]  # alice's images, float32 (d,)
    derived_entry: int  # bank entry made from alice's "coffee" upload
    independent_entries: set[int]
    log_file: Path
    redis: redis.Redis
    expected: dict[str, int] = field(default_factory=dict)

    @property
    def erased_ids(self) -> set[str]:
        return {uid for uid in self.alice.values() if uid != self.held}


def _write_policy(directory: Path) -> Path:
    document = yaml.safe_load((REPO_ROOT / "policies" / "default.yaml").read_text())
    document["categories"]["csam"] = {
        **document["categories"]["default"],
        "banks": ["*"],
        "legal_hold_days": 365,
        "legal_hold_basis": HOLD_BASIS,
    }
    directory.mkdir()
    (directory / "default.yaml").write_text(yaml.safe_dump(document))
    return directory


@pytest.fixture
def log_capture(tmp_path: Path) -> Iterator[Path]:
    """Every log record of the test, ``moderation`` at DEBUG, in a file."""
    path = tmp_path / "moderation.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("moderation")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    ours.setLevel(logging.DEBUG)
    # SQL echo would print bound parameters (pseudonyms); it is a debugging tool, off here as in
    # production.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    yield path
    root.removeHandler(handler)
    handler.close()
    root.setLevel(saved[0])
    ours.setLevel(saved[1])


def build_world(
    tmp_path: Path, database_url: str, redis_url: str, log_file: Path, *, hold: bool
) -> World:
    policies = _write_policy(tmp_path / "policies")
    overrides: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "database_url": database_url,
        "redis_url": redis_url,
        "policies_dir": policies,
        "log_level": "DEBUG",
    }
    settings = load_settings(**overrides)
    runtime = prepared_runtime(settings)
    with transaction(runtime.sessions) as session:
        signing_key(session, runtime.keyring, create=True, actor="cli")
    env = {
        "MODERATION_DATA_DIR": str(settings.data_dir),
        "MODERATION_DATABASE_URL": database_url,
        "MODERATION_REDIS_URL": redis_url,
        "MODERATION_POLICIES_DIR": str(policies),
        "MODERATION_LOG_LEVEL": "DEBUG",
    }
    images: dict[str, Path] = {}
    (tmp_path / "img").mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"):
        images[name] = tmp_path / "img" / f"{name}.jpg"
        skimage_photo(name).save(images[name], quality=90)
    with transaction(runtime.sessions) as session:
        from moderation.banks.records import create_bank

        create_bank(session, "known", category="default")
        create_bank(session, "csam-hashes", category="csam")
    known = import_bank(runtime, "known", [images["astronaut"], images["chelsea"]], actor="cli")
    held_bank = import_bank(runtime, "csam-hashes", [images["rocket"]], actor="cli")
    independent = {*known.added, *held_bank.added}

    def screen(subject: str, names: list[str]) -> dict[str, str]:
        ids: dict[str, str] = {}
        paths = [images[n] for n in names]

        def keep(row: dict[str, Any]) -> None:
            ids[Path(row["path"]).stem] = row["upload_id"]

        screen_paths(runtime, paths, subject_id=subject, on_result=keep)
        return ids

    alice_names = ["astronaut", "coffee", *(["rocket"] if hold else [])]
    alice = screen(ALICE, alice_names)
    bob = screen(BOB, ["chelsea", "motorcycle_left"])
    # A reviewer confirmed alice's coffee photo: a bank entry is made from her upload.
    derived = import_bank(runtime, "known", [images["coffee"]], actor="user:1").added[0]
    with transaction(runtime.sessions) as session:
        entry = session.get(Entry, derived)
        assert entry is not None
        entry.upload_id = alice["coffee"]
        for owner in (alice, bob):
            first = next(iter(owner.values()))
            session.add(ReviewItem(upload_id=first, category="default", state="decided"))
            session.add(
                LabelledPair(upload_id=first, entry_id=min(known.added), is_copy=True,
                             source="review", features={"cosine": 0.99})
            )  # fmt: skip
            session.add(
                CallbackAttempt(upload_id=first, url="https://platform.example/cb", attempt=1,
                                status_code=200, delivered=True)
            )  # fmt: skip
        if hold:
            session.add(ReviewItem(upload_id=alice["rocket"], category="csam", state="decided"))
            session.add(
                LabelledPair(upload_id=alice["rocket"], entry_id=min(held_bank.added),
                             is_copy=True, source="review")
            )  # fmt: skip
        lookup = lookup_key(session, runtime.keyring, ALICE)
        subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
        assert subject is not None
        ref = subject.ref
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    for client_id, owner in ((1, alice), (2, bob)):
        for name, uid in owner.items():
            client.set(f"{redis_key_prefix(uid)}:result", json.dumps({"decision": "x"}))
            client.hset(f"{redis_key_prefix(uid)}:status", mapping={"state": "done"})
            idem = hashlib.sha256(f"key-{name}".encode()).hexdigest()
            client.set(f"moderation:idem:{client_id}:{idem}", uid)
    client.set("moderation:unrelated", "keep me")
    decoded = []
    for name in alice_names:
        with Image.open(images[name]) as img:
            decoded.append(img.convert("RGB"))
    vectors = runtime.encoder.encode(decoded)
    with runtime.sessions() as session:
        held = next(
            (u for u in alice.values() if (row := session.get(Upload, u)) and row.legal_hold_until),
            None,
        )
    return World(
        runtime=runtime,
        settings=settings,
        env=env,
        images=images,
        alice=alice,
        bob=bob,
        held=held,
        ref=ref,
        lookup=lookup,
        vectors=dict(zip(alice_names, vectors, strict=True)),
        derived_entry=derived,
        independent_entries=independent,
        log_file=log_file,
        redis=client,
    )


@pytest.fixture
def make_world(
    database_url: str, redis_server: str, tmp_path: Path, log_capture: Path
) -> Callable[..., World]:
    """``make_world(hold=...)``: :func:`build_world` on this test's database, Redis and log."""
    return functools.partial(build_world, tmp_path, database_url, redis_server, log_capture)


def redis_key_prefix(upload_id: str) -> str:
    return f"moderation:upload:{upload_id}"


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The ``settings`` fixture clears MODERATION_*; CLI calls then see only what we set."""
    return monkeypatch


def run_cli(world: World, monkeypatch: pytest.MonkeyPatch, *args: str, **kw: Any) -> Result:
    from moderation.cli import main

    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


# --- walking the stores ---------------------------------------------------------------------


def _cell_texts(value: Any) -> list[bytes]:
    if value is None:
        return []
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return [raw, raw.hex().encode()]
    if isinstance(value, dict | list):
        return [json.dumps(value).encode()]
    return [str(value).encode()]


def walk_database(world: World) -> None:
    """Every row of every table: no subject id or lookup anywhere; the pseudonym and the erased
    upload ids only in the append-only audit log (by design: unlinkable, G6)."""
    never = [ALICE.encode(), world.lookup.encode()]
    audit_only = [world.ref.encode(), *(u.encode() for u in world.erased_ids)]
    engine = world.runtime.engine
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():
                for column, value in row.items():
                    for cell in _cell_texts(value):
                        for needle in never:
                            assert needle not in cell, f"{table}.{column} holds {needle!r}"
                        if table != "audit_events":
                            for needle in audit_only:
                                assert needle not in cell, f"{table}.{column} holds {needle!r}"
    if engine.dialect.name == "sqlite":
        # Deleted rows must not linger in free pages or the write-ahead log either.
        db_file = Path(str(engine.url.database))
        for path in (db_file, db_file.with_name(db_file.name + "-wal")):
            if path.exists():
                raw = path.read_bytes()
                for needle in never:
                    assert needle not in raw, f"{path.name} still holds {needle!r}"


def walk_blobs(world: World) -> None:
    blobs = world.settings.blobs_dir
    names = [p.name for p in blobs.rglob("*") if p.is_file()]
    for uid in world.erased_ids:
        assert not any(uid in n for n in names), f"blob of erased upload {uid} remains"
    plaintexts = [world.images[n].read_bytes()[:4096] for n in world.alice]
    for path in blobs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(p in data for p in plaintexts)


def walk_snapshot(world: World, before: dict[str, float]) -> None:
    snapshots = list(world.settings.snapshots_dir.glob("*.snapshot"))
    assert len(snapshots) == 1, "older snapshots (with the erased vectors) were not pruned"
    with world.runtime.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        payload = read_payload(session, world.runtime.keyring, world.settings.snapshots_dir, row)
    assert world.derived_entry not in {int(e) for e in payload.entry_ids}
    blocklist = world.runtime.load_blocklist()
    for name, vector in world.vectors.items():
        hits = blocklist.cosine.search(vector[None, :], k=5, threshold=0.95)[0]
        # Only the banned images imported on their own may still match alice's copies of them.
        assert {h.id for h in hits} <= world.independent_entries, name
        if not hits:  # an exact copy of a banned image has that image's vector, bit for bit
            assert vector.astype(np.float32).tobytes() not in payload.vectors.tobytes(), name
    # The photo a bank entry was made from matched it at ~1.0 before; now nothing is close.
    assert before["coffee"] > 0.99
    best = blocklist.cosine.search(world.vectors["coffee"][None, :], k=1, threshold=-1.0)[0]
    assert not best or best[0].score < 0.95


def walk_redis(world: World) -> None:
    keys = list(world.redis.scan_iter(match="*"))
    for key in keys:
        for uid in world.alice.values():
            assert uid not in key, f"Redis key {key} remains"
        if world.redis.type(key) == "string":
            assert world.redis.get(key) not in world.alice.values(), key
    for uid in world.bob.values():
        assert world.redis.exists(f"{redis_key_prefix(uid)}:result")
    assert sum(1 for k in keys if k.startswith("moderation:idem:2:")) == len(world.bob)
    assert world.redis.get("moderation:unrelated") == "keep me"


def walk_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    text_logged = world.log_file.read_text(encoding="utf-8") + caplog.text
    assert "erasure" in text_logged  # the capture did see the erasure
    for needle in (ALICE, world.lookup, world.ref):
        assert needle not in text_logged, needle


def walk_every_store(
    world: World, before: dict[str, float], caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of alice's erased uploads is left in the database, blobs, snapshot, Redis or
    logs (``before``: :func:`best_cosines` before the erasure)."""
    walk_database(world)
    walk_blobs(world)
    walk_snapshot(world, before)
    walk_redis(world)
    walk_logs(world, caplog)


def best_cosines(world: World) -> dict[str, float]:
    blocklist = world.runtime.load_blocklist()
    return {
        name: blocklist.cosine.search(v[None, :], k=1, threshold=-1.0)[0][0].score
        for name, v in world.vectors.items()
    }


def assert_references_unresolvable(world: World) -> None:
    """G6: the pseudonym in old audit events points nowhere, and cannot be recomputed."""
    with world.runtime.sessions() as session:
        assert find_subject(session, world.runtime.keyring, ALICE) is None
        assert session.scalar(select(Subject).where(Subject.ref == world.ref)) is None
        referencing = session.scalar(
            select(func.count()).where(AuditEvent.action == "screening.decide")
        )
        assert referencing
        fresh = pseudonymize(session, world.runtime.keyring, ALICE)
        assert fresh != world.ref  # a new secret: the old ref is not derivable any more
        session.rollback()


def assert_bob_intact(world: World) -> None:
    with world.runtime.sessions() as session:
        assert find_subject(session, world.runtime.keyring, BOB) is not None
        for uid in world.bob.values():
            upload = session.get(Upload, uid)
            assert upload is not None and upload.subject_ref is not None
            read_upload(upload, keyring=world.runtime.keyring, blobs_dir=world.settings.blobs_dir)
        assert session.scalar(select(func.count()).select_from(ReviewItem)) >= 1


def audit_verify_passes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli(world, monkeypatch, "audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")


def receipt_public_key(world: World) -> str:
    with world.runtime.sessions() as session:
        return public_key_hex(signing_key(session, world.runtime.keyring))


# --- G1 + done-when -------------------------------------------------------------------------


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
    for walk in (walk_database, walk_blobs, walk_redis):
        with pytest.raises(AssertionError):
            walk(world)

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
    assert counts["callback_attempts"] == 1 and counts["bank_entries"] == 1
    assert counts["redis_keys"] == 3 * 2 and counts["subject_secrets"] == 1
    assert receipt["held"]["uploads"] == 0
    key = load_public_key(receipt_public_key(world))
    assert verify_signature(receipt, key, expected_type=RECEIPT_TYPE) is None
    with world.runtime.sessions() as session:
        event = session.get(AuditEvent, receipt["audit_seq"])
        assert event is not None and event.action == "gdpr.erase"
        assert event.details["counts"] == counts
        request = session.get(ErasureRequest, receipt["request_id"])
        assert request is not None and request.state == "done" and request.receipt == receipt

    walk_every_store(world, before, caplog)
    assert_references_unresolvable(world)
    assert_bob_intact(world)
    audit_verify_passes(world, cli_env)

    # G4: a copy of the blob directory taken before the erasure is useless now.
    with world.runtime.sessions() as session:
        assert session.get(Upload, world.alice["coffee"]) is None  # row and wrapped key gone
    copied = next(backup.rglob(f"{world.alice['coffee']}*")).read_bytes()
    assert world.images["coffee"].read_bytes()[:4096] not in copied
    ring = world.runtime.keyring
    from moderation.crypto.aead import decrypt

    for key_id in ring.key_ids:  # not even a master key opens it: the data key is destroyed
        with pytest.raises(DecryptionError):
            decrypt(copied, ring.get(key_id), b"moderation/blob/v1\x00", context="backup")

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


# --- G2 -------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_g2_upload_under_legal_hold_is_kept_and_cited(
    make_world: Callable[..., World],
    cli_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from moderation.governance.holds import held_uploads, read_held_upload, release_expired_holds

    caplog.set_level(logging.DEBUG, logger="moderation")
    world = make_world(hold=True)
    assert world.held == world.alice["rocket"]
    with world.runtime.sessions() as session:
        upload = session.get(Upload, world.held)
        assert upload is not None and upload.legal_hold_until is not None
        until = upload.legal_hold_until
    before = best_cosines(world)
    result = run_cli(world, cli_env, "gdpr", "erase", ALICE, "--yes")
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout)
    assert receipt["counts"]["uploads"] == 2
    assert receipt["counts"]["labelled_pairs"] == 2  # the held upload's training pair goes too
    assert receipt["counts"]["redis_keys"] == 3 * 3  # caches of the held upload go too
    held = receipt["held"]
    assert held["uploads"] == 1
    assert held["kept"]["uploads"] == 1 and held["kept"]["blobs"] == 1
    assert held["kept"]["screenings"] == 1 and held["kept"]["review_items"] == 1
    (exception,) = held["exceptions"]
    assert exception["citation"] == f"{HOLD_BASIS}: 1 year"
    assert exception["category"] == "csam" and exception["uploads"] == 1

    walk_every_store(world, before, caplog)
    assert_references_unresolvable(world)
    audit_verify_passes(world, cli_env)

    # Kept: encrypted, detached from the person, readable only through an audited access.
    with world.runtime.sessions() as session:
        upload = session.get(Upload, world.held)
        assert upload is not None and upload.subject_ref is None
        assert upload.erasure_request_id == receipt["request_id"]
        assert [h["upload_id"] for h in held_uploads(session)] == [world.held]
        events_before = session.scalar(select(func.count()).select_from(AuditEvent))
    data = read_held_upload(world.runtime, world.held, actor="user:9", reason="NCMEC request 42")
    assert data == world.images["rocket"].read_bytes()
    with world.runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == events_before + 1
        last = session.scalar(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1))
        assert last is not None and last.action == "upload.read_held"
        assert last.actor == "user:9" and last.target == f"upload:{world.held}"
        assert last.details["reason"] == "NCMEC request 42"

    # Before the hold ends nothing is released; afterwards the upload is erased for good.
    assert release_expired_holds(world.runtime, actor="cli")["uploads"] == 0
    released = release_expired_holds(
        world.runtime, actor="cli", now=until.replace(tzinfo=UTC) + timedelta(seconds=1)
    )
    assert released["uploads"] == 1 and released["blobs"] == 1 and released["screenings"] == 1
    with world.runtime.sessions() as session:
        assert session.get(Upload, world.held) is None
    assert not list(world.settings.blobs_dir.rglob(f"{world.held}*"))
    audit_verify_passes(world, cli_env)


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
# Killed inside the database transaction (after bank entries and Redis keys went), and between
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


# --- the audit event is part of the action ---------------------------------------------------


def _break_audit_inserts(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if runtime.engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'audit store down'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION audit_down()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit store down'); END"
                )
            )


def _repair_audit_inserts(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if runtime.engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER audit_down ON audit_events"))
        else:
            conn.execute(text("DROP TRIGGER audit_down"))


@pytest.mark.redis
@pytest.mark.slow
def test_actions_fail_when_their_audit_event_cannot_be_written(
    make_world: Callable[..., World],
    cli_env: pytest.MonkeyPatch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import moderation.governance.gdpr as gdpr
    from moderation.governance.gdpr import erase_subject

    world = make_world(hold=False)
    runtime = world.runtime
    with runtime.sessions() as session:
        uploads = session.scalar(select(func.count()).select_from(Upload))
        version = current_snapshot(session).version  # type: ignore[union-attr]
    _break_audit_inserts(runtime)
    with pytest.raises(DBAPIError, match="audit store down"):
        set_bank_enabled(runtime, "known", enabled=False, actor="cli")
    with pytest.raises(DBAPIError, match="audit store down"):
        screen_paths(runtime, [world.images["chelsea"]], subject_id="carol", on_result=print)
    with pytest.raises(DBAPIError, match="audit store down"):
        erase_subject(runtime, ALICE, actor="cli")
    _repair_audit_inserts(runtime)
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == uploads
        snapshot = current_snapshot(session)
        assert snapshot is not None and snapshot.version == version
        from moderation.storage.models import Bank

        assert all(b.enabled for b in session.scalars(select(Bank)))
        assert find_subject(session, runtime.keyring, "carol") is None
        assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 0
    assert len(list(runtime.settings.snapshots_dir.glob("*.snapshot"))) == 1

    # The erasure's own closing event fails: the request stays open, and a rerun finishes it.
    real = gdpr.record_event

    def failing(session: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "gdpr.erase":
            raise DBAPIError("INSERT INTO audit_events", {}, Exception("audit store down"))
        return real(session, **kwargs)

    monkeypatch.setattr(gdpr, "record_event", failing)
    with pytest.raises(DBAPIError):
        erase_subject(runtime, ALICE, actor="cli")
    with runtime.sessions() as session:
        (request,) = session.scalars(select(ErasureRequest))
        assert request.state == "running" and request.receipt == {}
    monkeypatch.setattr(gdpr, "record_event", real)
    receipt = erase_subject(runtime, ALICE, actor="cli")
    assert receipt["request_id"] == request.id and receipt["counts"]["uploads"] == 2
    audit_verify_passes(world, cli_env)


# --- A6 -------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_a6_every_state_change_writes_exactly_one_complete_event(
    make_world: Callable[..., World],
    tmp_path: Path,
    cli_env: pytest.MonkeyPatch,
) -> None:
    from moderation.banks.operations import delete_entries, set_entry_disabled
    from moderation.governance.erasure_requests import register_request
    from moderation.governance.gdpr import erase_subject
    from moderation.governance.holds import read_held_upload
    from moderation.governance.keys import rotate_keys

    world = make_world(hold=True)
    runtime = world.runtime
    with transaction(runtime.sessions) as session:
        from moderation.audit.log import write_checkpoint

        write_checkpoint(session, runtime.keyring)
    audit_key = receipt_public_key(world)

    def one_event(action: str, run: Any, *, actor: str = "cli", count: int = 1) -> None:
        with runtime.sessions() as session:
            start = session.scalar(select(func.max(AuditEvent.seq))) or 0
        started = datetime.now(UTC) - timedelta(seconds=1)
        run()
        with runtime.sessions() as session:
            new = list(
                session.scalars(
                    select(AuditEvent).where(AuditEvent.seq > start).order_by(AuditEvent.seq)
                )
            )
        matching = [e for e in new if e.action == action]
        assert len(matching) == count, (action, [e.action for e in new])
        for event in matching:
            assert event.actor == actor  # who
            assert event.target  # what it was done to
            assert event.origin  # from where
            assert event.outcome == "success"
            assert event.ts.replace(tzinfo=UTC) >= started  # when

    one_event(
        "bank.create",
        lambda: run_cli(world, cli_env, "bank", "create", "extra", "--category", "default"),
    )
    one_event("bank.import", lambda: import_bank(runtime, "extra", [world.images["coffee"]],
                                                 actor="cli"))  # fmt: skip
    with runtime.sessions() as session:
        extra = max(session.scalars(select(Entry.id)))
    one_event(
        "entry.disable",
        lambda: set_entry_disabled(runtime, f"e_{extra}", disabled=True, actor="user:3"),
        actor="user:3",
    )
    one_event(
        "entry.enable",
        lambda: set_entry_disabled(runtime, f"e_{extra}", disabled=False, actor="user:3"),
        actor="user:3",
    )
    one_event("bank.disable", lambda: set_bank_enabled(runtime, "extra", enabled=False,
                                                       actor="cli"))  # fmt: skip
    one_event("entry.delete", lambda: delete_entries(runtime, [extra], actor="cli"))
    one_event(
        "screening.decide",
        lambda: screen_paths(
            runtime, [world.images["chelsea"], world.images["coffee"]], on_result=lambda r: None
        ),
        count=2,
    )
    one_event("keys.rotate", lambda: rotate_keys(runtime, retire_old=True, actor="cli"))
    one_event(
        "audit.export",
        lambda: run_cli(world, cli_env, "audit", "export", "--format", "csv", "--out",
                        str(tmp_path / "a.csv")),
    )  # fmt: skip
    one_event("gdpr.request", lambda: register_request(runtime, ALICE, actor="user:5"),
              actor="user:5")  # fmt: skip
    one_event("gdpr.erase", lambda: erase_subject(runtime, ALICE, actor="user:5"),
              actor="user:5")  # fmt: skip
    assert world.held is not None
    one_event(
        "upload.read_held",
        lambda: read_held_upload(runtime, world.held or "", actor="user:9", reason="court order"),
        actor="user:9",
    )
    # Key rotation re-wrapped the audit key (moderation.governance.keys, deployment_secrets step):
    # same key,
    # and the checkpoints signed before it still verify.
    assert receipt_public_key(world) == audit_key
    with runtime.sessions() as session:
        assert not session.scalars(
            select(ErasureRequest).where(ErasureRequest.state != "done")
        ).all()
        result = verify_chain(session, keyring=runtime.keyring)
    assert result.ok and result.checkpoints >= 2 and result.public_key == audit_key
    assert isinstance(runtime.keyring, KeyRing)


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
