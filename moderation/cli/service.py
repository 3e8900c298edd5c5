"""Service commands: serve (gunicorn), worker and beat (Celery), benchmark queue and load.

The library never imports Flask or Celery, so ``serve``, ``worker`` and ``beat`` replace this
process (``os.execvpe``) with gunicorn or Celery, which then build their apps from the same
``MODERATION_*`` settings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from moderation.cli import Context, config_errors, main, pass_ctx
from moderation.cli.core import benchmark
from moderation.config import Settings

ALL_QUEUES = "screening,maintenance,callbacks"
_CELERY = (sys.executable, "-m", "celery", "-A", "workers.celery_app:app")


def _beat_schedule_file(settings: Settings) -> str:
    return str(settings.resolved_data_dir / "celerybeat-schedule")


def service_env(settings: Settings) -> dict[str, str]:
    """The environment for a server or worker process: metrics directory, import path."""
    env = dict(os.environ)
    metrics = settings.metrics_path
    metrics.mkdir(parents=True, exist_ok=True, mode=0o700)
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics))
    # The exec'd process imports `admin` and `workers` from the same tree as this `moderation`.
    root = str(Path(__file__).resolve().parents[2])
    if (Path(root) / "workers").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _exec(argv: list[str], env: dict[str, str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # noqa: S606 - replaces this process by design


def _check(ctx: Context) -> None:
    with config_errors():
        ctx.settings.ensure_dirs()
        ctx.runtime.check_initialised()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", "processes", default=2, show_default=True, help="gunicorn processes.")
@click.option(
    "--worker-class",
    type=click.Choice(["gevent", "gthread"]),
    default="gevent",
    show_default=True,
    help="gevent: one greenlet per connection (slow clients and ?wait= hold no thread); "
    "gthread: a fixed thread pool, only behind a buffering proxy.",
)
@click.option(
    "--connections",
    default=1000,
    show_default=True,
    help="Concurrent connections per process (gevent).",
)
@click.option(
    "--threads", type=int, help="Threads per process, only with --worker-class gthread [8]."
)
@pass_ctx
def serve(
    ctx: Context,
    host: str,
    port: int,
    processes: int,
    worker_class: str,
    connections: int,
    threads: int | None,
) -> None:
    """Serve the upload-hook API and the console with gunicorn (a production WSGI server).

    The default gevent workers serve each connection in a greenlet, so slow clients
    (slowloris) and ``?wait=`` long polls hold no OS thread (README "Serving model",
    RELIABILITY.md S1/S2)."""
    if threads is not None and worker_class != "gthread":
        raise click.UsageError("--threads applies to --worker-class gthread only")
    _check(ctx)
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers",
        str(processes),
        "--worker-class",
        worker_class,
        *(
            ["--worker-connections", str(connections)]
            if worker_class == "gevent"
            else ["--threads", str(threads or 8)]
        ),
        "--timeout",
        "60",
        "--graceful-timeout",
        "20",
        "--access-logfile",
        "-",
        "--no-control-socket",
        "--config",
        "python:admin.gunicorn_conf",
        "admin:create_app()",
    ]
    _exec(argv, service_env(ctx.settings))


@main.command()
@click.option(
    "--queues", default=ALL_QUEUES, show_default=True, help="Comma-separated queues to consume."
)
@click.option("--concurrency", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--beat/--no-beat",
    default=None,
    help="Also run the reconciler schedule in this worker (default: only without a broker).",
)
@click.option(
    "--shard",
    type=int,
    help="Hold shard N of the cosine index and answer its searches only (queue shard-N; "
    "needs MODERATION_INDEX_SHARDS > N).",
)
@pass_ctx
def worker(
    ctx: Context, queues: str, concurrency: int, beat: bool | None, shard: int | None
) -> None:
    """Run a Celery worker (screening, callbacks, maintenance), or a shard worker (--shard)."""
    _check(ctx)
    settings = ctx.settings
    if shard is not None:
        shards = settings.index_shards
        if shards < 2 or not 0 <= shard < shards:
            known = f"shards are 0 to {shards - 1}" if shards > 1 else "the index is not sharded"
            raise click.UsageError(f"--shard {shard}: MODERATION_INDEX_SHARDS is {shards}, {known}")
        queues, beat = f"shard-{shard}", False
    argv = [
        *_CELERY,
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"moderation-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--optimization",
        "fair",
        "--loglevel",
        settings.log_level,
    ]
    if beat if beat is not None else settings.broker_url is None:
        argv += ["--beat", "--schedule", _beat_schedule_file(settings)]
    _exec(argv, service_env(settings))


@main.command()
@pass_ctx
def beat(ctx: Context) -> None:
    """Run Celery beat: sends the reconciler every MODERATION_RECONCILE_INTERVAL seconds."""
    _check(ctx)
    settings = ctx.settings
    argv = [
        *_CELERY,
        "beat",
        "--schedule",
        _beat_schedule_file(settings),
        "--loglevel",
        settings.log_level,
    ]
    _exec(argv, service_env(settings))


@benchmark.command("speed")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Photos to time (default: ../shared/data/photos-dev, else scikit-image's photos).",
)
@click.option(
    "--index-sizes",
    default="100000,1000000",
    show_default=True,
    help="Comma-separated bank sizes for the index section ('' skips it).",
)
@click.option("--bank-size", default=100, show_default=True, help="Bank of the pipeline section.")
@click.option("--repeats", default=3, show_default=True, help="Timed repeats (median).")
@click.option(
    "--stages/--no-stages",
    default=True,
    show_default=True,
    help="Time decode, PDQ, encoder and pipeline (--no-stages: only the index section).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_speed(
    ctx: Context,
    images_dir: Path | None,
    index_sizes: str,
    bank_size: int,
    repeats: int,
    stages: bool,
    json_out: Path | None,
) -> None:
    """Every fast path against its baseline in one run: decode, PDQ, encoder (batch 1 and 32),
    pipeline per image, index search/recall/memory/snapshot load at each bank size."""
    from moderation.benchmark.speed import run_speed_benchmark

    sizes = _sizes("--index-sizes", index_sizes)
    with config_errors():
        report = run_speed_benchmark(
            ctx.settings,
            images_dir=images_dir,
            index_sizes=sizes,
            bank_size=bank_size,
            repeats=repeats,
            stages=stages,
            echo=click.echo,
        )
    _write_report(json_out, report)


def _sizes(option: str, value: str) -> list[int]:
    """Comma-separated integers of ``option``.

    Raises:
        click.UsageError: not integers.
    """
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.UsageError(f"{option} must be comma-separated integers: {exc}") from exc


@benchmark.command("hashes")
@click.option(
    "--sizes",
    default="100000,1000000",
    show_default=True,
    help="Comma-separated hash-list lengths (generated PDQ digests).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_hashes(ctx: Context, sizes: str, json_out: Path | None) -> None:
    """Hash-list banks: import lines/s of a generated PDQ list, snapshot load time, and PDQ
    lookup p50/p99 and recall at radius 31, at each size."""
    from moderation.benchmark.hashes import run_hash_benchmark

    lengths = _sizes("--sizes", sizes)
    with config_errors():
        report = run_hash_benchmark(ctx.settings, lengths, click.echo)
    _write_report(json_out, report)


@benchmark.command("queue")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of photos: the bank and the uploads are drawn from it.",
)
@click.option("--bank-size", default=100, show_default=True)
@click.option("--uploads", default=200, show_default=True)
@click.option("--wait-requests", default=50, show_default=True, help="Sequential ?wait= requests.")
@click.option("--concurrency", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--shards",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Cosine index shards, each held by its own `worker --shard i` (needs redis-server).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_queue(
    ctx: Context,
    images_dir: Path,
    bank_size: int,
    uploads: int,
    wait_requests: int,
    concurrency: int,
    shards: int,
    json_out: Path | None,
) -> None:
    """Uploads/s through the queue (one worker) vs in-process screening, and ?wait= latency.

    Runs in a fresh temporary data dir with its own `serve` and `worker` processes, on the
    configured broker (MODERATION_BROKER_URL), or the no-broker SQLite transport when unset.
    """
    from moderation.benchmark.queue import run_queue_benchmark

    with config_errors():
        report = run_queue_benchmark(
            ctx.settings,
            images_dir,
            bank_size=bank_size,
            uploads=uploads,
            wait_requests=wait_requests,
            concurrency=concurrency,
            shards=shards,
            echo=click.echo,
        )
    _write_report(json_out, report)


@benchmark.command("load")
@click.option(
    "--database",
    type=click.Choice(["sqlite", "postgresql", "both"]),
    default="both",
    show_default=True,
    help="postgresql: a temporary database on --postgres-url's server, dropped afterwards.",
)
@click.option("--duration", type=float, help="Seconds per phase [30; --quick 3].")
@click.option("--rate", type=float, help="Steady phase, uploads/s (all clients) [5; --quick 3].")
@click.option("--burst-rate", type=float, help="Burst phases, uploads/s [70; --quick 12].")
@click.option("--clients", type=int, help="API clients, each with its own token [16; --quick 4].")
@click.option("--client-limit", help="Per-client rate limit of the first two phases [2/second].")
@click.option("--drain-timeout", type=float, help="Seconds to wait for results per phase [900].")
@click.option("--quick", is_flag=True, help="Tiny phases (tests, smoke checks).")
@click.option(
    "--queue-max-depth",
    type=int,
    help="The web tier's queue bound, global and per client [80: about 4 s of one worker].",
)
@click.option(
    "--worker-class",
    type=click.Choice(["gevent", "gthread"]),
    help="`serve`'s gunicorn worker class [gevent; gthread: the thread-per-request model].",
)
@click.option(
    "--postgres-url",
    default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    show_default=True,
    help="Admin connection that creates and drops the temporary database.",
)
@click.option(
    "--model-cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder keeping the encoder's ONNX model between runs (default: built once per run).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def benchmark_load(
    ctx: Context,
    database: str,
    duration: float | None,
    rate: float | None,
    burst_rate: float | None,
    clients: int | None,
    client_limit: str | None,
    drain_timeout: float | None,
    quick: bool,
    queue_max_depth: int | None,
    worker_class: str | None,
    postgres_url: str,
    model_cache: Path | None,
    json_out: Path | None,
) -> None:
    """Load test over HTTP of a fresh deployment (private Redis, `serve`, one `worker`):
    steady, burst under per-client limits, burst with the limits lifted. Prints per phase the
    answers by status, POST and upload-to-result latency, lost and wrong uploads, peak RSS of
    web, worker and Redis, and /status/live latency."""
    from moderation.benchmark.load import DATABASES, LoadOptions, run_load_benchmark

    base = LoadOptions.quick() if quick else LoadOptions()
    options = base.with_overrides(
        duration=duration,
        rate=rate,
        burst_rate=burst_rate,
        clients=clients,
        client_limit=client_limit,
        drain_timeout=drain_timeout,
        worker_class=worker_class,
        queue_max_depth=queue_max_depth,
    )
    databases = list(DATABASES) if database == "both" else [database]
    with config_errors():
        report = run_load_benchmark(
            ctx.settings,
            databases,
            options,
            postgres_admin_url=postgres_url,
            model_cache=model_cache,
            echo=click.echo,
        )
    _write_report(json_out, report)


def _write_report(json_out: Path | None, report: object) -> None:
    """Write a benchmark's report as indented JSON when ``--json`` was given."""
    if json_out is not None:
        import json

        json_out.write_text(json.dumps(report, indent=2))
