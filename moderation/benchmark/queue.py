"""``moderation benchmark queue``: throughput through the queue and ``?wait=`` latency.

In a fresh temporary data dir: a bank of the first ``bank_size`` images, then the first
``uploads`` images (so the bank's images come back as blocks and the rest as allows) are

1. screened in-process exactly as ``moderation screen`` does (``operations.screen_paths``:
   batched encoder, encrypted upload rows), giving uploads/s;
2. posted concurrently to a real ``moderation serve`` (their own Redis on a spare port when
   ``redis-server`` is installed, else the no-broker SQLite transport) with no worker running;
   then ``worker`` processes start and drain the queue, timed from their first to their last
   recorded result (``screenings.created_at``): uploads/s of the worker alone, and its ratio
   to the in-process rate;
3. posted one at a time with ``?wait=10`` to the idle service: p50/p99 latency, ms.

With ``shards`` > 1 (Redis needed) the deployment's cosine index is sharded (issue 16 item 3):
``shards`` shard workers (``worker --shard i``) start with the service, and the screening worker
searches them through Celery; the in-process figure stays unsharded.

The figures depend on the machine's load, printed alongside (1-minute load average).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.benchmark.processes import (
    RedisServer,
    Service,
    child_env,
    free_port,
    http_ok,
    polling_engine,
    wait_for,
)
from moderation.config import Settings, load_settings

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

_Process = Service | RedisServer


def _bank_and_queries(
    images_dir: Path, bank_size: int, uploads: int
) -> tuple[list[Path], list[Path]]:
    """The first ``bank_size`` and the first ``uploads`` images under ``images_dir``, sorted.

    Raises:
        ValueError: fewer images than ``max(bank_size, uploads)``.
    """
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < max(bank_size, uploads):
        raise ValueError(f"{images_dir} has {len(files)} images; need {max(bank_size, uploads)}")
    return files[:bank_size], files[:uploads]


def bench_values(settings: Settings, work: Path) -> dict[str, Any]:
    """Settings of the benchmark's own deployment in ``work``, with a fresh master key."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        "data_dir": work / "var",
        "master_keys": f"bench:{key}",
        "encoder": settings.encoder,
        "device": settings.device,
        "torch_threads": settings.torch_threads,
        "faiss_threads": settings.faiss_threads,
        "batch_size": settings.batch_size,
        "api_rate_limit": "1000000/minute",
        # The queue is pre-filled with the worker stopped: no depth bound may refuse that.
        "queue_max_depth": 1_000_000,
        "queue_max_depth_per_client": 1_000_000,
        # The web process refuses to start in production without a strong console secret.
        "secret_key": secrets.token_urlsafe(48),
        "log_level": "WARNING",
    }


def bench_runtime(values: dict[str, Any], bank: list[Path], echo: Callable[[str], None]) -> Runtime:
    """A migrated runtime for ``values`` whose block bank ``bench`` holds ``bank``."""
    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.service.runtime import Runtime
    from moderation.storage.db import migrate, transaction

    bench = load_settings(**values)
    bench.ensure_dirs()
    runtime = Runtime(bench)
    migrate(runtime.engine)
    with transaction(runtime.sessions) as session:
        create_bank(session, "bench")
    start = time.perf_counter()
    import_bank(runtime, "bench", bank, actor="benchmark")
    echo(f"bank: {len(bank)} images imported in {time.perf_counter() - start:.1f} s")
    return runtime


class _Uploader:
    """Posts the query images to the upload-hook API as one API client."""

    def __init__(self, base: str, token: str, datas: list[bytes]) -> None:
        self.base = base
        self.datas = datas
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def post(self, index: int, wait: float = 0.0) -> str:
        """Upload image ``index`` (modulo the count); the new upload's id."""
        response = self.http.post(
            f"{self.base}/api/v1/screenings",
            params={"wait": str(wait)} if wait else {},
            data={"external_id": f"q{index}", "subject_id": "bench"},
            files={"image": ("image", self.datas[index % len(self.datas)])},
            timeout=60,
        )
        response.raise_for_status()
        return str(response.json()["id"])


def _start_broker(values: dict[str, Any], work: Path, processes: list[_Process]) -> str:
    """A private Redis as the broker in ``values`` when ``redis-server`` is installed (else the
    no-broker SQLite transport stays); the broker's description for the report."""
    redis_server = shutil.which("redis-server")
    if not redis_server:
        return "sqlite transport (no broker)"
    redis = RedisServer(work / "redis", redis_server)
    redis.start()
    processes.append(redis)
    values["broker_url"] = redis.url
    return "redis (private)"


def _start_shards(
    values: dict[str, Any], env: dict[str, str], work: Path, processes: list[_Process]
) -> None:
    """One ``worker --shard i`` per shard when ``values`` shard the cosine index.

    Raises:
        ValueError: shards without Redis (the shards answer through it).
    """
    shards = int(values.get("index_shards", 1))
    if shards > 1 and "broker_url" not in values:
        raise ValueError("--shards needs redis-server (the shards answer through Redis)")
    for shard in range(shards if shards > 1 else 0):
        args = ["worker", "--shard", str(shard)]
        processes.append(Service.moderation("shard", args, env, work / f"shard-{shard}.log"))


def _in_process_rate(runtime: Runtime, queries: list[Path]) -> tuple[float, float]:
    """Uploads/s of ``queries`` screened as ``moderation screen`` does, and the 1-minute load
    average just before."""
    from moderation.service.operations import screen_paths

    runtime.screener()  # weights loaded before timing
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = screen_paths(runtime, queries, on_result=lambda _row: None, actor="benchmark")
    return len(results) / (time.perf_counter() - start), load_before


def _start_service(
    runtime: Runtime,
    env: dict[str, str],
    work: Path,
    processes: list[_Process],
    queries: list[Path],
) -> _Uploader:
    """``moderation serve`` on a free port, once it answers; an uploader of ``queries`` to it
    with a new API client's token.

    Raises:
        TimeoutError: the service did not answer within 300 s.
    """
    from moderation.service.api_clients import create_api_client
    from moderation.storage.db import transaction

    port = free_port()
    serve_args = ["serve", "--port", str(port), "--workers", "1"]
    processes.append(Service.moderation("serve", serve_args, env, work / "serve.log"))
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{base}/status/live"), 300, "the web service to answer")
    with transaction(runtime.sessions) as session:
        token = create_api_client(session, runtime.keyring, "bench").token
    return _Uploader(base, token, [p.read_bytes() for p in queries])


def _worker_rate(runtime: Runtime, ids: list[str]) -> float:
    """Uploads/s of the worker, once every upload in ``ids`` is done: from the first to the
    last recorded result."""
    from moderation.storage.models import Screening, Upload

    reader = polling_engine(runtime.engine)

    def all_done() -> bool:
        with Session(reader) as session:
            done = session.scalar(
                select(func.count()).where(Upload.id.in_(ids), Upload.status == "done")
            )
        return bool(done == len(ids))

    wait_for(all_done, 3600, "every queued upload to be decided")
    with Session(reader) as session:
        finished = sorted(
            session.scalars(select(Screening.created_at).where(Screening.upload_id.in_(ids)))
        )
    span = (finished[-1] - finished[0]).total_seconds()
    # n results complete in n - 1 intervals after the first one.
    return (len(finished) - 1) / span if span > 0 else float("inf")


def _post_all(uploader: _Uploader) -> tuple[list[str], float]:
    """Every query posted once, 8 at a time: the uploads' ids and uploads/s."""
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(uploader.post, range(len(uploader.datas))))
    return ids, len(ids) / (time.perf_counter() - start)


def _wait_latency(uploader: _Uploader, requests_count: int) -> dict[str, float]:
    """p50 and p99 round-trip ms of ``requests_count`` uploads with ``?wait=10``, one at a
    time."""
    latencies = []
    for n in range(requests_count):
        t0 = time.perf_counter()
        uploader.post(n, wait=10.0)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return {
        "wait_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "wait_p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def _echo_log_tails(work: Path, echo: Callable[[str], None]) -> None:
    for name in ("serve.log", "worker.log", "shard-0.log", "shard-1.log"):
        log_path = work / name
        if log_path.is_file():
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            echo(f"--- last lines of {name} ---\n" + "\n".join(tail))


def _stop(processes: list[_Process]) -> None:
    """Stop ``processes``, last started first."""
    for proc in reversed(processes):
        if isinstance(proc, RedisServer):
            proc.stop_without_saving()
        else:
            proc.stop(30)


def _echo_report(echo: Callable[[str], None], report: dict[str, Any], wait_requests: int) -> None:
    echo(
        f"queue benchmark ({report['images']} images, bank of {report['bank']}, "
        f"{report['workers']} worker process(es), {report['shards']} index shard(s), "
        f"broker: {report['broker']}, CPU "
        f"{os.cpu_count()} cores, load {report['load_1min'][0]} -> {report['load_1min'][1]})"
    )
    echo(f"  in-process (`moderation screen`): {report['in_process_uploads_per_s']:.2f} uploads/s")
    echo(
        f"  one worker alone, queue pre-filled: {report['worker_uploads_per_s']:.2f} uploads/s "
        f"(ratio to in-process {report['worker_vs_in_process']:.2f})"
    )
    echo(f"  (posting through HTTP, worker stopped: {report['post_uploads_per_s']:.2f} uploads/s)")
    echo(
        f"  ?wait= latency over {wait_requests} requests: p50 {report['wait_p50_ms']:.0f} ms, "
        f"p99 {report['wait_p99_ms']:.0f} ms"
    )


def run_queue_benchmark(
    settings: Settings,
    images_dir: Path,
    *,
    bank_size: int,
    uploads: int,
    wait_requests: int,
    concurrency: int = 1,
    shards: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three measurements above and return (and echo) the figures.

    Raises:
        ValueError: fewer images in ``images_dir`` than ``max(bank_size, uploads)``, or
            ``shards`` > 1 without ``redis-server``.
        TimeoutError: the service did not become ready or finish in time.
    """
    bank, queries = _bank_and_queries(images_dir, bank_size, uploads)
    work = Path(tempfile.mkdtemp(prefix="moderation-bench-queue-"))
    processes: list[_Process] = []
    report: dict[str, Any] = dict(images=uploads, bank=bank_size, workers=concurrency)
    try:
        values = bench_values(settings, work)
        report["broker"] = _start_broker(values, work, processes)
        values["index_shards"] = report["shards"] = shards
        runtime = bench_runtime(values, bank, echo)

        # 1. In-process, as `moderation screen`.
        inprocess, load_before = _in_process_rate(runtime, queries)
        report["in_process_uploads_per_s"] = round(inprocess, 2)

        # 2. Through the queue.
        env = child_env(values)
        uploader = _start_service(runtime, env, work, processes, queries)
        _start_shards(values, env, work, processes)

        # 2. Every upload is queued first, then one worker starts and drains the queue: its rate
        # is measured from its own completion times, so neither the HTTP side nor the worker's
        # start-up (torch, encoder, snapshot) competes with or enters the figure.
        ids, post_rate = _post_all(uploader)
        report["post_uploads_per_s"] = round(post_rate, 2)
        worker_args = ["worker", "--concurrency", str(concurrency)]
        processes.append(Service.moderation("worker", worker_args, env, work / "worker.log"))
        worker_rate = _worker_rate(runtime, ids)
        report["worker_uploads_per_s"] = round(worker_rate, 2)
        report["worker_vs_in_process"] = round(worker_rate / inprocess, 3)

        # 3. ?wait= latency, one request at a time on a warm, idle worker.
        report.update(_wait_latency(uploader, wait_requests))
        report["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    except TimeoutError:
        _echo_log_tails(work, echo)
        raise
    finally:
        _stop(processes)
        shutil.rmtree(work, ignore_errors=True)
    _echo_report(echo, report, wait_requests)
    return report
