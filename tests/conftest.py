"""Fixtures shared by every test: settings in a private data dir, photos, ../shared data, and the
audit-log database handle (``db``) of the integration audit tests."""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageDraw
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.log import (
    record_event,
    signing_key,
    write_checkpoint,
)
from moderation.audit.verify import verify_chain
from moderation.config import Settings, load_settings
from moderation.crypto.keys import KeyRing
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction
from moderation.storage.models import AuditCheckpoint

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime
    from moderation.storage.models import IndexSnapshot
    from tests.integration.queue_stack import CallbackReceiver, RedisServer, Stack

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED_DIR / "data"

# Photos scikit-image ships inside its wheel: real camera images, no download.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
)


@contextmanager
def migrated_runtime(settings: Settings) -> Iterator[Runtime]:
    """A runtime over ``settings`` with its data dir, a dev key ring and the current schema;
    its engine is disposed on exit."""
    from moderation.service.runtime import prepared_runtime

    rt = prepared_runtime(settings)
    try:
        yield rt
    finally:
        rt.engine.dispose()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside a developer checkout)")
    return path


def imagenet_top1_on_photos_dev(classify: Callable[[list[Image.Image]], Any]) -> float:
    """ImageNet top-1 of ``classify`` (images -> logits (n, 1000), timm's class order) on the
    photos-dev JPEGs, whose names start with their WordNet id; skips when ../shared is absent."""
    import numpy as np
    from timm.data.imagenet_info import ImageNetInfo

    files = sorted(shared_path("photos-dev").glob("*.JPEG"))
    assert len(files) >= 100
    info = ImageNetInfo()
    index_of = {info.index_to_label_name(i): i for i in range(1000)}
    labels = np.array([index_of[f.name.split("_", 1)[0]] for f in files])
    predicted = []
    for start in range(0, len(files), 32):
        images = []
        for file in files[start : start + 32]:
            with Image.open(file) as img:
                images.append(img.convert("RGB"))
        predicted.append(np.asarray(classify(images)).argmax(axis=1))
    top1 = float((np.concatenate(predicted) == labels).mean())
    print(f"ImageNet top-1 on {len(files)} photos-dev images: {top1:.4f}")
    return top1


def skimage_photo_path(name: str) -> Path:
    """The file of a photo shipped in scikit-image's wheel (``skimage.data``)."""
    from skimage import data

    base = Path(data.__file__).parent
    for candidate in base.iterdir():
        if candidate.stem == name:
            return candidate
    raise FileNotFoundError(name)


def force_compaction(runtime: Runtime) -> IndexSnapshot:
    """Compact every snapshot chain of ``runtime`` now (``compact_chains`` with ``force``) and
    return the first chain's new full version, detached from its session."""
    from moderation.banks.compaction import CompactionRule, compact_chains

    with transaction(runtime.sessions) as session:
        (row, _), *_ = compact_chains(
            session,
            keyring=runtime.keyring,
            snapshots_dir=runtime.settings.snapshots_dir,
            rule=CompactionRule(),
            force=True,
        )
        assert row.base_version is None
        session.expunge(row)
    return row


def skimage_photo(name: str) -> Image.Image:
    """A scikit-image photo as an RGB Pillow image."""
    with Image.open(skimage_photo_path(name)) as img:
        return img.convert("RGB")


def _centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The middle of ``image``, ``fraction`` of each side cut away."""
    w, h = image.size
    return image.crop(
        (int(w * fraction), int(h * fraction), int(w * (1 - fraction)), int(h * (1 - fraction)))
    )


def _lower_half_covered(image: Image.Image) -> Image.Image:
    out = image.copy()
    ImageDraw.Draw(out).rectangle((0, out.height // 2, out.width, out.height), fill=(255, 0, 0))
    return out


@pytest.fixture
def review_band_copies(tmp_path: Path) -> dict[str, Path]:
    """Edited copies of three scikit-image photos, as JPEG (quality 85) in ``tmp_path``, by name:
    astronaut and coffee centre-cropped (25% and 30% of each side cut away), rocket with its
    lower half covered in red.

    Against a bank holding the originals, their match with the default encoder and policy falls
    in the review band (policies/default.yaml: cosine 0.70-0.78): measured 0.735, 0.724 and
    0.745.
    """
    edits = {
        "astronaut": lambda image: _centre_crop(image, 0.25),
        "coffee": lambda image: _centre_crop(image, 0.30),
        "rocket": _lower_half_covered,
    }
    copies: dict[str, Path] = {}
    for name, edit in edits.items():
        copies[name] = tmp_path / f"{name}-edited.jpg"
        edit(skimage_photo(name)).save(copies[name], quality=85)
    return copies


def loopback_callbacks(settings: Settings) -> Settings:
    """``settings`` with the development setting ``callback_allow_loopback`` on: the tests'
    callback receivers listen on plain http at 127.0.0.1, which production refuses."""
    return load_settings(
        **{**settings.model_dump(exclude_unset=True), "callback_allow_loopback": True}
    )


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings in a private data dir, with the environment's MODERATION_* cleared."""

    for key in list(os.environ):
        if key.startswith("MODERATION_"):
            monkeypatch.delenv(key)
    yield load_settings(data_dir=tmp_path / "var")


# --- databases ----------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _postgres_available() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    from sqlalchemy import text

    try:
        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any driver/connection error means: no server here
        return f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the local PostgreSQL; skips (with the reason) when it is down."""
    reason = _postgres_available()
    if reason:
        pytest.skip(reason)
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""

    from moderation.benchmark.processes import temporary_postgres

    with temporary_postgres(postgres_server, prefix="mod_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: SQLite in tmp_path, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[object]:
    """A :class:`moderation.service.runtime.Runtime` over ``settings``: data dir, schema, dev key
    ring."""
    with migrated_runtime(settings) as rt:
        yield rt


# --- the queue tests' stack (tests/integration/queue_stack.py holds the machinery) ------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` on a spare port (stopped and restarted by fault tests)."""
    from tests.integration.queue_stack import running_redis

    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """A local HTTP server that records the callbacks it receives."""
    from tests.integration.queue_stack import running_receiver

    with running_receiver() as server:
        yield server


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Builds API + worker stacks in ``tmp_path``; stops every process at teardown."""
    from tests.integration.queue_stack import stack_factory

    with stack_factory(tmp_path) as make:
        yield make


@pytest.fixture
def make_pg_stack(
    postgres_url: str, redis_server: RedisServer, make_stack: Callable[..., Stack]
) -> Callable[..., Stack]:
    """``make_stack`` on a fresh PostgreSQL database with the test's Redis as broker (set up
    in this order so teardown stops the stack's processes before Redis and the database go)."""
    return functools.partial(make_stack, database_url=postgres_url, broker_url=redis_server.url)


@pytest.fixture
def race() -> Callable[[Callable[[int], Any], Sequence[int]], dict[int, Any]]:
    """``race(work, keys)``: ``work(key)`` for every key, each in a thread of its own, all let go
    at once (a barrier); returns ``{key: result}`` once every thread ended (120 s join each) and
    fails the test on any exception a thread raised."""

    def run(work: Callable[[int], Any], keys: Sequence[int]) -> dict[int, Any]:
        start = threading.Barrier(len(keys))
        got: dict[int, Any] = {}
        errors: list[BaseException] = []

        def one(key: int) -> None:
            try:
                start.wait()
                got[key] = work(key)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(key,)) for key in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        return got

    return run


class Cli:
    """Runs ``moderation`` commands in-process (click's runner, the console script's code path)
    against one data directory, with the environment's other MODERATION_* cleared."""

    def __init__(self, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_dir = data_dir

        for key in list(os.environ):
            if key.startswith("MODERATION_"):
                monkeypatch.delenv(key)
        monkeypatch.setenv("MODERATION_DATA_DIR", str(data_dir))
        monkeypatch.setenv("MODERATION_LOG_LEVEL", "WARNING")
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True) -> Result:
        from moderation.cli import main

        result = self.runner.invoke(main, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, (args, result.output, result.stderr)
        return result

    def json_lines(self, *args: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self(*args).stdout.splitlines() if line.strip()]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """A :class:`Cli` over ``tmp_path / "var"``."""
    return Cli(tmp_path / "var", monkeypatch)


def bank_photos(cli: Cli, folder: Path, names: Sequence[str], bank: str = "known-bad") -> None:
    """Initialise ``cli``'s data dir, create block bank ``bank`` and import the scikit-image
    photos ``names`` (copied into ``folder`` first, so source refs are their file names)."""
    cli("init")
    cli("bank", "create", bank)
    folder.mkdir()
    for name in names:
        shutil.copy(skimage_photo_path(name), folder / skimage_photo_path(name).name)
    cli("bank", "import", bank, str(folder))


def assert_nowhere_in(data_dir: Path, needles: Sequence[bytes]) -> None:
    """Fail naming the file when any of ``needles`` occurs in any file under ``data_dir``
    (which must hold at least one encrypted snapshot: the scan is of a data dir in use)."""
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".snapshot" for p in files)
    for path in files:
        content = path.read_bytes()
        for needle in needles:
            assert needle not in content, f"plaintext signal found in {path}"


# --- the audit log on SQLite and PostgreSQL (integration/test_audit_log_*.py) -------------


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
