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

The figures depend on the machine's load, printed alongside (1-minute load average).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import requests
from sqlalchemy import func, select

from moderation.config import Settings, load_settings

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: timed out waiting for {what}")
        time.sleep(0.2)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
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


def _bench_values(settings: Settings, work: Path) -> dict[str, Any]:
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


def _bench_runtime(
    values: dict[str, Any], bank: list[Path], echo: Callable[[str], None]
) -> Runtime:
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


def _child_env(values: dict[str, Any]) -> dict[str, str]:
    """This process's environment for ``serve`` and ``worker``: the benchmark's settings as
    ``MODERATION_*`` variables (no outside ones), this checkout first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({f"MODERATION_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p
    )
    return env


def _start_moderation(
    args: list[str], env: dict[str, str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """``python -m moderation <args>`` with ``env``, stdout and stderr to ``log``."""
    return subprocess.Popen(  # noqa: S603 - this interpreter, fixed argv
        [sys.executable, "-m", "moderation", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


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


def _start_broker(
    values: dict[str, Any], work: Path, processes: list[subprocess.Popen[bytes]]
) -> str:
    """A private Redis as the broker in ``values`` when ``redis-server`` is installed (else the
    no-broker SQLite transport stays); the broker's description for the report."""
    redis_server = shutil.which("redis-server")
    if not redis_server:
        return "sqlite transport (no broker)"
    redis_port = _free_port()
    processes.append(start_redis_server(redis_port, work, redis_server))
    values["broker_url"] = f"redis://127.0.0.1:{redis_port}/0"
    return "redis (private)"


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
    log: IO[bytes],
    processes: list[subprocess.Popen[bytes]],
    queries: list[Path],
) -> _Uploader:
    """``moderation serve`` on a free port, once it answers; an uploader of ``queries`` to it
    with a new API client's token.

    Raises:
        TimeoutError: the service did not answer within 300 s.
    """
    from moderation.service.api_clients import create_api_client
    from moderation.storage.db import transaction

    port = _free_port()
    serve_args = ["serve", "--port", str(port), "--workers", "1"]
    processes.append(_start_moderation(serve_args, env, log))
    base = f"http://127.0.0.1:{port}"
    _wait(lambda: _ok(f"{base}/status/live"), 300, "the web service to answer")
    with transaction(runtime.sessions) as session:
        token = create_api_client(session, runtime.keyring, "bench").token
    return _Uploader(base, token, [p.read_bytes() for p in queries])


def _worker_rate(runtime: Runtime, ids: list[str]) -> float:
    """Uploads/s of the worker, once every upload in ``ids`` is done: from the first to the
    last recorded result."""
    from moderation.storage.models import Screening, Upload

    def all_done() -> bool:
        with runtime.sessions() as session:
            done = session.scalar(
                select(func.count()).where(Upload.id.in_(ids), Upload.status == "done")
            )
        return bool(done == len(ids))

    _wait(all_done, 3600, "every queued upload to be decided")
    with runtime.sessions() as session:
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
    for name in ("serve.log", "worker.log"):
        log_path = work / name
        if log_path.is_file():
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            echo(f"--- last lines of {name} ---\n" + "\n".join(tail))


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate ``processes`` (last started first), killing any not gone within 30 s."""
    for proc in reversed(processes):
        proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _echo_report(echo: Callable[[str], None], report: dict[str, Any], wait_requests: int) -> None:
    echo(
        f"queue benchmark ({report['images']} images, bank of {report['bank']}, "
        f"{report['workers']} worker process(es), broker: {report['broker']}, CPU "
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
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three measurements above and return (and echo) the figures.

    Raises:
        ValueError: fewer images in ``images_dir`` than ``max(bank_size, uploads)``.
        TimeoutError: the service did not become ready or finish in time.
    """
    bank, queries = _bank_and_queries(images_dir, bank_size, uploads)
    work = Path(tempfile.mkdtemp(prefix="moderation-bench-queue-"))
    processes: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"images": uploads, "bank": bank_size, "workers": concurrency}
    try:
        values = _bench_values(settings, work)
        report["broker"] = _start_broker(values, work, processes)
        runtime = _bench_runtime(values, bank, echo)

        # 1. In-process, as `moderation screen`.
        inprocess, load_before = _in_process_rate(runtime, queries)
        report["in_process_uploads_per_s"] = round(inprocess, 2)

        # 2. Through the queue.
        env = _child_env(values)
        logs = (work / "serve.log").open("wb"), (work / "worker.log").open("wb")
        uploader = _start_service(runtime, env, logs[0], processes, queries)

        # 2. Every upload is queued first, then one worker starts and drains the queue: its rate
        # is measured from its own completion times, so neither the HTTP side nor the worker's
        # start-up (torch, encoder, snapshot) competes with or enters the figure.
        ids, post_rate = _post_all(uploader)
        report["post_uploads_per_s"] = round(post_rate, 2)
        worker_args = ["worker", "--concurrency", str(concurrency)]
        processes.append(_start_moderation(worker_args, env, logs[1]))
        worker_rate = _worker_rate(runtime, ids)
        report["worker_uploads_per_s"] = round(worker_rate, 2)
        report["worker_vs_in_process"] = round(worker_rate / inprocess, 3)

        # 3. ?wait= latency, one request at a time on a warm, idle worker.
        report.update(_wait_latency(uploader, wait_requests))
        report["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for log in logs:
            log.close()
    except TimeoutError:
        _echo_log_tails(work, echo)
        raise
    finally:
        _stop(processes)
        shutil.rmtree(work, ignore_errors=True)
    _echo_report(echo, report, wait_requests)
    return report
