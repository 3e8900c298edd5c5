"""Process management shared by the benchmarks that run a real deployment (``benchmark queue``,
``benchmark load``) and by the integration tests' service stack (``tests/integration/
queue_stack.py``): spare ports, a private Redis, a temporary PostgreSQL database, ``moderation``
subprocesses in their own session, and their environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
from sqlalchemy import Engine, create_engine, text

from moderation.config import ConfigurationError

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` every ``interval`` s until it returns something truthy; that value.

    Raises:
        TimeoutError: still falsy after ``timeout`` s (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether GET ``url`` answers 200 within ``timeout`` s."""
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def start_redis_server(
    port: int, workdir: Path, executable: str = "redis-server"
) -> subprocess.Popen[bytes]:
    """Start a private ``redis-server`` on 127.0.0.1:``port`` that never writes to disk (no RDB
    snapshots, no append-only file; ``workdir`` is its working directory), output discarded.

    Returns as soon as the process is spawned, before it answers; the caller stops it.

    Raises:
        OSError: ``executable`` cannot be run (e.g. ``FileNotFoundError``: not installed).
    """
    return subprocess.Popen(  # noqa: S603 - fixed argv, no outside input
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class RedisServer:
    """A private ``redis-server`` on a spare port (no persistence, like a restart without
    saving)."""

    def __init__(self, workdir: Path, executable: str = "redis-server") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        """Start it and wait until it answers PING.

        Raises:
            OSError: ``redis-server`` cannot be run.
            TimeoutError: no answer within 20 s.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = start_redis_server(self.port, self.workdir, self.executable)
        wait_for(self.ping, 20, f"redis on port {self.port}", interval=0.1)

    def stop_without_saving(self) -> None:
        """SIGKILL: whatever was queued in memory is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def llen(self, key: str) -> int:
        import redis

        return int(redis.Redis(port=self.port).llen(key))


def child_env(values: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """This process's environment for a ``moderation`` subprocess: ``values`` as
    ``MODERATION_*`` variables (replacing every outside one), no prometheus directory of ours,
    this checkout first on ``PYTHONPATH``, then ``extra`` verbatim."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({f"MODERATION_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


class Service:
    """A subprocess (``argv``, by default ``python -m moderation ...``) in its own session, so
    it can be stopped or killed with all its children (gunicorn workers, Celery's pool)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.handle = log.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - argv built by the caller from fixed parts
            argv,
            env=env,
            cwd=REPO,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def moderation(cls, name: str, args: list[str], env: dict[str, str], log: Path) -> Service:
        """``python -m moderation <args>`` with this interpreter."""
        return cls(name, [sys.executable, "-m", "moderation", *args], env, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_all(self) -> None:
        """SIGKILL the process and every process of its session (a container kill)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the session, SIGKILL whatever is left after ``timeout`` s; close the log."""
        if self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
        if self.alive():
            self.kill_all()
        else:
            # Leftover pool children of a main process that died first.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.handle.close()

    def output(self) -> str:
        self.handle.flush()
        return self.log.read_text(errors="replace")


@contextmanager
def temporary_postgres(admin_url: str, prefix: str = "moderation_load") -> Iterator[str]:
    """A fresh PostgreSQL database named ``<prefix>_<12 hex digits>`` (``CREATE DATABASE``
    through ``admin_url``), dropped on exit with any session still connected to it; its URL.

    Raises:
        ConfigurationError: the server at ``admin_url`` does not answer.
    """
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any driver or connection error: no usable server
        admin.dispose()
        raise ConfigurationError(f"PostgreSQL at {admin_url} is not usable: {exc}") from exc
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE (PostgreSQL 13+) ends the sessions and drops in one statement: a pool
            # reconnecting between a pg_terminate_backend and the DROP cannot make it fail.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def polling_engine(engine: Engine) -> Engine:
    """An engine for a benchmark to poll ``engine``'s database for results while the service
    writes to it: for SQLite a plain engine on the same file, since the service's engines take
    the write lock at every BEGIN (``moderation/storage/db.py``) and a poll through one would
    wait for (and hold up) the writers, while a WAL reader never waits; else ``engine`` itself.
    """
    if engine.dialect.name == "sqlite":
        return create_engine(engine.url)
    return engine
