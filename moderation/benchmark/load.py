"""``moderation benchmark load``: an operator's load test of a real deployment over HTTP.

For each database (SQLite in the data dir, or a temporary PostgreSQL database created and
dropped here) a fresh deployment in a temporary data dir: a private ``redis-server`` (broker
and rate-limit store), ``moderation serve`` (its default gunicorn processes and threads) and one
``moderation worker`` (concurrency 1), a block bank of three photos
(:mod:`moderation.benchmark.load_images`) and ``clients`` API clients. Then three phases, each
drained before the next (every accepted upload decided, or ``drain_timeout`` passed):

1. ``steady``: ``rate`` uploads/s, under the per-client limit ``client_limit``;
2. ``burst``: ``burst_rate`` uploads/s spread over the clients, each client above its limit and
   the whole above what one worker screens;
3. ``burst_unlimited``: the same burst after ``serve`` restarted with the limit lifted.

Per phase: answers by HTTP status, accepted-POST latency, upload-to-result time (the POST's
send time to the result's ``screenings.created_at``, read from the database, so polling loads
neither the service nor the clients' rate limits), lost and wrong uploads, peak memory of each
component (:mod:`moderation.benchmark.process_rss`) and, in the bursts, ``/status/live``
latency (RELIABILITY.md S3: "healthy" means under 1 s).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from moderation.benchmark.load_images import PoolImage, bank_photos, upload_pool
from moderation.benchmark.load_phase import LiveProbe, LoadGenerator, Post, RssSampler
from moderation.benchmark.load_report import machine_figures, phase_figures
from moderation.benchmark.processes import (
    RedisServer,
    Service,
    child_env,
    free_port,
    http_ok,
    polling_engine,
    temporary_postgres,
    wait_for,
)
from moderation.benchmark.queue import bench_runtime, bench_values
from moderation.config import ConfigurationError, Settings

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
UNLIMITED = "1000000/second"
DATABASES = ("sqlite", "postgresql")
IN_CHUNK = 500  # ids per SQL IN list (SQLite allows 32766 variables; stay far below)


@dataclass(frozen=True)
class LoadOptions:
    """Phase sizes. ``rate``/``burst_rate`` in uploads/s over all clients together,
    ``duration`` and ``drain_timeout`` in s, ``client_limit`` in the limits library's syntax."""

    duration: float = 30.0
    rate: float = 5.0
    burst_rate: float = 70.0
    clients: int = 16
    client_limit: str = "2/second"
    drain_timeout: float = 900.0
    pool_size: int = 200
    threads: int = 64
    worker_class: str = "gevent"  # `moderation serve --worker-class` (gthread: the old model)
    #: MODERATION_QUEUE_MAX_DEPTH of the web tier (and per client): about 4 s of one worker's
    #: screening here, so results stay within seconds and the bound answers 503 past it.
    queue_max_depth: int = 80

    @classmethod
    def quick(cls) -> LoadOptions:
        """Tiny phases for tests: 3 s each, 3 and 12 uploads/s from 4 clients."""
        return cls(duration=3.0, rate=3.0, burst_rate=12.0, clients=4, drain_timeout=300.0)

    def with_overrides(self, **values: Any) -> LoadOptions:
        """These options with every non-None value of ``values`` replacing its field."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


class Deployment:
    """Redis, database, ``serve`` and one ``worker`` of one benchmark run, in ``work``."""

    def __init__(
        self, work: Path, values: dict[str, Any], redis: RedisServer, model_cache: Path
    ) -> None:
        self.work = work
        self.model_cache = model_cache
        self.values = values
        self.redis = redis
        self.runtime: Runtime | None = None
        self.web: Service | None = None
        self.worker: Service | None = None
        self.base = ""
        self.tokens: list[str] = []
        self.reader: Engine | None = None

    def prepare(self, clients: int) -> None:
        """Schema, the bank of :func:`bank_photos`, and ``clients`` API clients.

        The encoder's ONNX model (``<data dir>/cache``, built on first use, about 30 s) is
        copied from and to ``model_cache``, so a second database's deployment reuses it (every
        load checks its digests and probe: see ``signals/encoders/onnx_model.py``)."""
        from moderation.service.api_clients import create_api_client
        from moderation.storage.db import transaction

        bank_dir = self.work / "bank"
        bank_dir.mkdir()
        files = []
        for name, data in bank_photos().items():
            files.append(bank_dir / f"{name}.jpg")
            files[-1].write_bytes(data)
        data_dir = Path(self.values["data_dir"])
        data_dir.mkdir(mode=0o700)
        cache = data_dir / "cache"
        cache.mkdir(mode=0o700)
        shutil.copytree(self.model_cache, cache, dirs_exist_ok=True)
        self.runtime = runtime = bench_runtime(self.values, files, lambda _line: None)
        shutil.copytree(cache, self.model_cache, dirs_exist_ok=True)
        self.reader = polling_engine(runtime.engine)
        with transaction(runtime.sessions) as session:
            self.tokens = [
                create_api_client(session, runtime.keyring, f"load-{n}", actor="benchmark").token
                for n in range(clients)
            ]

    def start_web(self, rate_limit: str, options: LoadOptions) -> None:
        """(Re)start ``moderation serve`` with the per-client ``rate_limit``; wait until
        ``/status/live`` answers.

        Raises:
            TimeoutError: no answer within 300 s.
        """
        if self.web is not None:
            self.web.stop()
        port = free_port()
        env = child_env({**self.values, "api_rate_limit": rate_limit})
        args = ["serve", "--port", str(port), "--worker-class", options.worker_class]
        self.web = Service.moderation("serve", args, env, self.log("web"))
        self.base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{self.base}/status/live"), 300, "`moderation serve`")

    def start_worker(self) -> None:
        args = ["worker", "--concurrency", "1"]
        self.worker = Service.moderation("worker", args, child_env(self.values), self.log("worker"))

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def pids(self) -> dict[str, int]:
        assert self.web is not None and self.worker is not None and self.redis.proc is not None
        return {"web": self.web.pid, "worker": self.worker.pid, "redis": self.redis.proc.pid}

    def finished(self, ids: list[str]) -> dict[str, tuple[str, float]]:
        """Of ``ids``, the uploads with a result: ``{id: (decision, unix time recorded)}``."""
        from moderation.storage.models import Screening, Upload

        assert self.reader is not None, "prepare() first"
        out: dict[str, tuple[str, float]] = {}
        with Session(self.reader) as session:
            for at in range(0, len(ids), IN_CHUNK):
                query = (
                    select(Upload.id, Screening.decision, Screening.created_at)
                    .join(Screening, Screening.upload_id == Upload.id)
                    .where(Upload.id.in_(ids[at : at + IN_CHUNK]), Upload.status == "done")
                )
                for upload_id, decision, created in session.execute(query):
                    out[upload_id] = (decision, _unix(created))
        return out

    def drain(self, ids: list[str], timeout: float) -> dict[str, tuple[str, float]]:
        """Poll the database (every 0.5 s) until every upload of ``ids`` has its result or
        ``timeout`` s passed; the finished ones."""
        done: dict[str, tuple[str, float]] = {}
        deadline = time.monotonic() + timeout
        while True:
            done.update(self.finished([i for i in ids if i not in done]))
            if len(done) == len(ids) or time.monotonic() > deadline:
                return done
            self._check_alive()
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for service in (self.web, self.worker):
            if service is not None and not service.alive():
                tail = service.output()[-3000:]
                raise RuntimeError(f"`moderation {service.name}` exited:\n{tail}")

    def close(self) -> None:
        for service in (self.worker, self.web):
            if service is not None:
                service.stop()
        self.redis.stop_without_saving()
        if self.reader is not None:
            self.reader.dispose()
        if self.runtime is not None:
            self.runtime.engine.dispose()


def _unix(moment: datetime) -> float:
    """``moment`` as Unix time; a naive value (SQLite drops the zone) is UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _warm_up(deployment: Deployment, pool: list[PoolImage]) -> None:
    """One upload through the whole path, so the worker has loaded the encoder and the
    snapshot before the first phase.

    Raises:
        TimeoutError: no result within 600 s.
    """
    generator = LoadGenerator(deployment.base, deployment.tokens[:1], pool[:1], threads=1)
    post = generator.run(rate=1.0, duration=1.0)[0]
    upload_id = post.upload_id
    if upload_id is None:
        raise RuntimeError(f"the warm-up upload was answered {post.status}")
    wait_for(lambda: deployment.finished([upload_id]), 600, "the warm-up upload's result")


def run_phase(
    deployment: Deployment,
    generator: LoadGenerator,
    pool: list[PoolImage],
    *,
    rate: float,
    options: LoadOptions,
    probe_live: bool,
) -> dict[str, Any]:
    """One phase: offer ``rate`` uploads/s for ``options.duration`` s, drain; its figures."""
    sampler = RssSampler(deployment.pids())
    probe = LiveProbe(deployment.base) if probe_live else None
    sampler.start()
    if probe is not None:
        probe.start()
    started = time.monotonic()
    posts: list[Post] = generator.run(rate, options.duration)
    sending_s = time.monotonic() - started
    if probe is not None:
        probe.stop()
    ids = [p.upload_id for p in posts if p.accepted and p.upload_id is not None]
    drain_start = time.monotonic()
    done = deployment.drain(ids, options.drain_timeout)
    drain_s = time.monotonic() - drain_start
    sampler.stop()
    figures = phase_figures(posts, done, pool, sampler.peaks, probe)
    figures.update(
        offered_per_s=rate,
        sent_per_s=round(len(posts) / sending_s, 2),
        sending_s=round(sending_s, 2),
        drain_s=round(drain_s, 2),
    )
    return figures


def _run_database(
    settings: Settings,
    database: str,
    options: LoadOptions,
    places: tuple[str, Path],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The three phases against ``database``, in a fresh deployment; ``places``: the
    PostgreSQL admin URL, and the folder that keeps the ONNX model between deployments."""
    postgres_admin_url, model_cache = places
    work = Path(tempfile.mkdtemp(prefix=f"moderation-bench-load-{database}-"))
    redis = RedisServer(work / "redis", shutil.which("redis-server") or "redis-server")
    try:
        with _database_url(database, postgres_admin_url) as url:
            redis.start()
            values = bench_values(settings, work)
            values.update(
                broker_url=redis.url,
                api_rate_limit=options.client_limit,
                # The queue bound answering instead of queueing without end (S3).
                queue_max_depth=options.queue_max_depth,
                queue_max_depth_per_client=options.queue_max_depth,
                queue_retry_after=settings.queue_retry_after,
            )
            if url is not None:
                values["database_url"] = url
            deployment = Deployment(work, values, redis, model_cache)
            try:
                return _phases(deployment, options, echo)
            except Exception:  # show why, whatever it was, then let it propagate
                for name in ("web", "worker"):
                    tail = deployment.log(name).read_text(errors="replace")[-3000:]
                    echo(f"--- last lines of {name}.log ---\n{tail}")
                raise
            finally:
                deployment.close()
    finally:
        redis.stop_without_saving()
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _database_url(database: str, postgres_admin_url: str) -> Iterator[str | None]:
    if database == "postgresql":
        with temporary_postgres(postgres_admin_url) as url:
            yield url
    else:
        yield None  # the SQLite file in the data dir


def _start(deployment: Deployment, options: LoadOptions, pool: list[PoolImage]) -> dict[str, float]:
    """Bank, clients, worker and web started, one upload decided; seconds each step took."""
    clock = time.monotonic()
    took: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        took[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    deployment.prepare(options.clients)
    lap("bank_s")
    deployment.start_worker()  # its start-up overlaps the web's
    deployment.start_web(options.client_limit, options)
    lap("web_s")
    _warm_up(deployment, pool)
    lap("worker_and_first_result_s")
    return took


def _phases(
    deployment: Deployment, options: LoadOptions, echo: Callable[[str], None]
) -> dict[str, Any]:
    pool = upload_pool(options.pool_size)
    startup = _start(deployment, options, pool)
    echo(f"  deployment ready: {startup}")
    generator = LoadGenerator(deployment.base, deployment.tokens, pool, options.threads)
    phases: dict[str, Any] = {}
    for name, rate, limited in (
        ("steady", options.rate, True),
        ("burst", options.burst_rate, True),
        ("burst_unlimited", options.burst_rate, False),
    ):
        if not limited:
            deployment.start_web(UNLIMITED, options)
            generator.url = f"{deployment.base}/api/v1/screenings"
        echo(f"  phase {name}: {rate:g} uploads/s for {options.duration:g} s ...")
        phases[name] = run_phase(
            deployment, generator, pool, rate=rate, options=options, probe_live=name != "steady"
        )
        phases[name]["client_limit"] = options.client_limit if limited else None
    return {"startup": startup, "phases": phases}


def run_load_benchmark(
    settings: Settings,
    databases: list[str],
    options: LoadOptions,
    *,
    postgres_admin_url: str = PG_ADMIN_URL,
    model_cache: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three phases against each of ``databases``; the figures (echoed as tables).

    ``model_cache`` keeps the encoder's ONNX model between deployments and runs (default: a
    temporary folder for this run).

    Raises:
        ConfigurationError: ``redis-server`` is not installed, or PostgreSQL is not usable.
        TimeoutError: a component did not start in time.
        RuntimeError: ``serve`` or the worker exited during a phase.
    """
    from moderation.benchmark.load_report import echo_tables

    if shutil.which("redis-server") is None:
        raise ConfigurationError("benchmark load needs redis-server (scripts/services.sh)")
    report: dict[str, Any] = {"machine": machine_figures(), "options": asdict(options)}
    report["databases"] = {}
    with tempfile.TemporaryDirectory(prefix="moderation-bench-load-model-") as scratch:
        cache = model_cache or Path(scratch)
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        for database in databases:
            echo(f"load benchmark on {database} ...")
            report["databases"][database] = _run_database(
                settings, database, options, (postgres_admin_url, cache), echo
            )
    report["machine"]["load_1min_after"] = machine_figures()["load_1min"]
    echo_tables(report, echo)
    return report
