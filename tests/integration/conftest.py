"""Shared fixtures of the integration tests: the GDPR world (RELIABILITY.md G1-G6, A6).

A small world on SQLite and on PostgreSQL: three banks (one in a category under legal hold, one
in a category whose matches go to review), a data subject ("alice") and another ("bob") whose
photos were screened with the real encoder, their review items settled by a real reviewer
through the review code (alice's confirm makes a bank entry from her upload, with labelled
pairs), callback attempts, and a Redis server (started per test module on a spare port) that the
service is configured with but keeps no per-upload data in; and the walks over every store that
the erasure tests run after ``moderation gdpr erase``.
Used by ``test_gdpr_erasure.py``, ``test_gdpr_holds.py`` and ``test_gdpr_audit.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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

from moderation.audit.log import public_key_hex, signing_key
from moderation.banks.operations import import_bank
from moderation.banks.versions import current_snapshot, read_payload
from moderation.benchmark.processes import free_port, start_redis_server
from moderation.config import Settings, load_settings
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.subjects import find_subject, lookup_key, pseudonymize
from moderation.service.uploads import read_upload
from moderation.storage.db import transaction
from moderation.storage.models import (
    AuditEvent,
    CallbackAttempt,
    Entry,
    ReviewItem,
    Subject,
    Upload,
    User,
)
from tests.conftest import skimage_photo

REPO_ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice.subject-4711@example.com"
BOB = "bob.subject-0815@example.org"
HOLD_BASIS = "18 U.S.C. 2258A (as amended 2024)"


# --- services -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gdpr_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a spare port (no persistence), stopped after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
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
    # Matches of the "triage" bank go to a reviewer: the world's review items are real.
    document["categories"]["triage"] = {**document["categories"]["default"], "action": "review"}
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


def _prepare_runtime(
    tmp_path: Path, database_url: str, redis_url: str
) -> tuple[Runtime, Settings, dict[str, str]]:
    """A migrated runtime with its audit signing key, and the environment the CLI needs."""
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
    return runtime, settings, env


def _write_images(directory: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    directory.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"):
        images[name] = directory / f"{name}.jpg"
        skimage_photo(name).save(images[name], quality=90)
    return images


def _screen(
    runtime: Runtime, images: dict[str, Path], subject: str, names: list[str]
) -> dict[str, str]:
    ids: dict[str, str] = {}
    paths = [images[n] for n in names]

    def keep(row: dict[str, Any]) -> None:
        ids[Path(row["path"]).stem] = row["upload_id"]

    screen_paths(runtime, paths, subject_id=subject, on_result=keep)
    return ids


def _review(runtime: Runtime, upload_id: str, decision: str, bank: str | None = None) -> None:
    """A reviewer claims the upload's review item and settles it (the console's code path)."""
    from moderation.governance.review import claim_next
    from moderation.governance.review_decisions import decide
    from moderation.governance.users import create_user

    with transaction(runtime.sessions) as session:
        reviewer = session.scalar(select(User).where(User.email == "reviewer@example.org"))
        if reviewer is None:
            reviewer_id = create_user(
                session, runtime.keyring, email="reviewer@example.org", role="reviewer",
                password="a long reviewer passphrase", totp=None, actor="cli",
            ).user_id  # fmt: skip
        else:
            reviewer_id = reviewer.id
        item_id = session.scalar(select(ReviewItem.id).where(ReviewItem.upload_id == upload_id))
        assert item_id is not None, "the upload did not go to review"
        others = session.scalars(select(ReviewItem.id).where(ReviewItem.id != item_id)).all()
        item = claim_next(
            session, reviewer_id=reviewer_id, lease_seconds=60, daily_limit=100, exclude=others
        )
        assert item is not None and item.id == item_id
    decide(runtime, item_id, reviewer_id=reviewer_id, decision=decision, bank_name=bank)


def _add_callback_attempts(session: Any, owners: tuple[dict[str, str], ...]) -> None:
    """A delivered callback attempt for each owner's first upload."""
    for owner in owners:
        first = next(iter(owner.values()))
        session.add(
            CallbackAttempt(upload_id=first, url="https://platform.example/cb", attempt=1,
                            status_code=200, delivered=True)
        )  # fmt: skip


def _redis_keys(redis_url: str) -> redis.Redis:
    """The service's Redis, emptied, with one key of someone else's that erasure must keep."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    client.set("moderation:unrelated", "keep me")
    return client


def _encode_images(
    runtime: Runtime, images: dict[str, Path], names: list[str]
) -> dict[str, npt.NDArray[np.float32]]:
    decoded = []
    for name in names:
        with Image.open(images[name]) as img:
            decoded.append(img.convert("RGB"))
    vectors = runtime.encoder.encode(decoded)
    return dict(zip(names, vectors, strict=True))


def build_world(
    tmp_path: Path, database_url: str, redis_url: str, log_file: Path, *, hold: bool
) -> World:
    runtime, settings, env = _prepare_runtime(tmp_path, database_url, redis_url)
    images = _write_images(tmp_path / "img")
    with transaction(runtime.sessions) as session:
        from moderation.banks.records import create_bank

        create_bank(session, "known", category="default")
        create_bank(session, "csam-hashes", category="csam")
        create_bank(session, "triage", category="triage")
    known = import_bank(runtime, "known", [images["astronaut"], images["chelsea"]], actor="cli")
    held_bank = import_bank(runtime, "csam-hashes", [images["rocket"]], actor="cli")
    triage = import_bank(
        runtime, "triage", [images["coffee"], images["motorcycle_left"]], actor="cli"
    )
    independent = {*known.added, *held_bank.added, *triage.added}
    alice_names = ["astronaut", "coffee", *(["rocket"] if hold else [])]
    alice = _screen(runtime, images, ALICE, alice_names)
    bob = _screen(runtime, images, BOB, ["motorcycle_left", "chelsea"])
    # A reviewer confirms alice's coffee photo into "known": a bank entry is made from her
    # upload; bob's motorcycle is not a match.
    _review(runtime, alice["coffee"], "confirm", "known")
    _review(runtime, bob["motorcycle_left"], "not_a_match")
    with transaction(runtime.sessions) as session:
        derived = session.scalar(select(Entry.id).where(Entry.upload_id == alice["coffee"]))
        assert derived is not None
        _add_callback_attempts(session, (alice, bob))
        lookup = lookup_key(session, runtime.keyring, ALICE)
        subject = session.scalar(select(Subject).where(Subject.lookup == lookup))
        assert subject is not None
        ref = subject.ref
    client = _redis_keys(redis_url)
    vectors = _encode_images(runtime, images, alice_names)
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
        vectors=vectors,
        derived_entry=derived,
        independent_entries=independent,
        log_file=log_file,
        redis=client,
    )


@pytest.fixture
def make_world(
    database_url: str, gdpr_redis_url: str, tmp_path: Path, log_capture: Path
) -> Callable[..., World]:
    """``make_world(hold=...)``: :func:`build_world` on this test's database, Redis and log."""
    return functools.partial(build_world, tmp_path, database_url, gdpr_redis_url, log_capture)


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
    # The photo a bank entry was made from matched it at ~1.0 before; now only the triage
    # bank's own copy (imported on its own, not from alice) is close.
    assert before["coffee"] > 0.99
    best = blocklist.cosine.search(world.vectors["coffee"][None, :], k=3, threshold=0.95)[0]
    assert {h.id for h in best} <= world.independent_entries


def walk_redis(world: World) -> None:
    """Nothing of alice's in Redis, and erasure deleted nothing there: the service writes no
    per-upload keys, so an erasure has none to delete (and must not touch other data)."""
    keys = list(world.redis.scan_iter(match="*"))
    for key in keys:
        for uid in world.alice.values():
            assert uid not in key, f"Redis key {key} remains"
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
