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
from typing import Any

import numpy as np
import requests
from sqlalchemy import func, select

from moderation.config import Settings, load_settings

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
    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.service.api_clients import create_api_client
    from moderation.service.operations import screen_paths
    from moderation.service.runtime import Runtime
    from moderation.storage.db import migrate, transaction
    from moderation.storage.models import Screening, Upload

    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < max(bank_size, uploads):
        raise ValueError(f"{images_dir} has {len(files)} images; need {max(bank_size, uploads)}")
    bank, queries = files[:bank_size], files[:uploads]
    work = Path(tempfile.mkdtemp(prefix="moderation-bench-queue-"))
    processes: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"images": uploads, "bank": bank_size, "workers": concurrency}
    try:
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        values: dict[str, Any] = {
            "data_dir": work / "var",
            "master_keys": f"bench:{key}",
            "encoder": settings.encoder,
            "device": settings.device,
            "torch_threads": settings.torch_threads,
            "faiss_threads": settings.faiss_threads,
            "batch_size": settings.batch_size,
            "api_rate_limit": "1000000/minute",
            # The web process refuses to start in production without a strong console secret.
            "secret_key": secrets.token_urlsafe(48),
            "log_level": "WARNING",
        }
        redis_proc = None
        redis_server = shutil.which("redis-server")
        if redis_server:
            redis_port = _free_port()
            redis_proc = subprocess.Popen(  # noqa: S603 - fixed argv, no outside input
                [
                    redis_server,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(redis_proc)
            values["broker_url"] = f"redis://127.0.0.1:{redis_port}/0"
        report["broker"] = "redis (private)" if redis_proc else "sqlite transport (no broker)"
        bench = load_settings(**values)
        bench.ensure_dirs()
        runtime = Runtime(bench)
        migrate(runtime.engine)
        with transaction(runtime.sessions) as session:
            create_bank(session, "bench")
        start = time.perf_counter()
        import_bank(runtime, "bench", bank, actor="benchmark")
        echo(f"bank: {bank_size} images imported in {time.perf_counter() - start:.1f} s")

        # 1. In-process, as `moderation screen`.
        runtime.screener()  # weights loaded before timing
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        results = screen_paths(runtime, queries, on_result=lambda _row: None, actor="benchmark")
        inprocess = len(results) / (time.perf_counter() - start)
        report["in_process_uploads_per_s"] = round(inprocess, 2)
        del results

        # 2. Through the queue.
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update({f"MODERATION_{k.upper()}": str(v) for k, v in values.items()})
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p
        )
        logs = (work / "serve.log").open("wb"), (work / "worker.log").open("wb")
        processes.append(
            subprocess.Popen(  # noqa: S603 - this interpreter, fixed argv
                [
                    sys.executable,
                    "-m",
                    "moderation",
                    "serve",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--threads",
                    "16",
                ],
                env=env,
                stdout=logs[0],
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _ok(f"{base}/status/live"), 300, "the web service to answer")
        with transaction(runtime.sessions) as session:
            token = create_api_client(session, runtime.keyring, "bench").token
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        datas = [p.read_bytes() for p in queries]

        def post(index: int, wait: float = 0.0) -> str:
            response = http.post(
                f"{base}/api/v1/screenings",
                params={"wait": str(wait)} if wait else {},
                data={"external_id": f"q{index}", "subject_id": "bench"},
                files={"image": ("image", datas[index % len(datas)])},
                timeout=60,
            )
            response.raise_for_status()
            return str(response.json()["id"])

        # 2. Every upload is queued first, then one worker starts and drains the queue: its rate
        # is measured from its own completion times, so neither the HTTP side nor the worker's
        # start-up (torch, encoder, snapshot) competes with or enters the figure.
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(post, range(len(datas))))
        report["post_uploads_per_s"] = round(len(ids) / (time.perf_counter() - start), 2)
        processes.append(
            subprocess.Popen(  # noqa: S603 - this interpreter, fixed argv
                [sys.executable, "-m", "moderation", "worker", "--concurrency", str(concurrency)],
                env=env,
                stdout=logs[1],
                stderr=subprocess.STDOUT,
            )
        )

        def all_done() -> bool:
            with runtime.sessions() as session:
                done = session.scalar(
                    select(func.count()).where(Upload.id.in_(ids), Upload.status == "done")
                )
            return done == len(ids)

        _wait(all_done, 3600, "every queued upload to be decided")
        with runtime.sessions() as session:
            finished = sorted(
                session.scalars(select(Screening.created_at).where(Screening.upload_id.in_(ids)))
            )
        span = (finished[-1] - finished[0]).total_seconds()
        # n results complete in n - 1 intervals after the first one.
        worker_rate = (len(finished) - 1) / span if span > 0 else float("inf")
        report["worker_uploads_per_s"] = round(worker_rate, 2)
        report["worker_vs_in_process"] = round(worker_rate / inprocess, 3)

        # 3. ?wait= latency, one request at a time on a warm, idle worker.
        latencies = []
        for n in range(wait_requests):
            t0 = time.perf_counter()
            post(n, wait=10.0)
            latencies.append((time.perf_counter() - t0) * 1000.0)
        report["wait_p50_ms"] = round(float(np.percentile(latencies, 50)), 1)
        report["wait_p99_ms"] = round(float(np.percentile(latencies, 99)), 1)
        report["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for log in logs:
            log.close()
    except TimeoutError:
        for name in ("serve.log", "worker.log"):
            log_path = work / name
            if log_path.is_file():
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                echo(f"--- last lines of {name} ---\n" + "\n".join(tail))
        raise
    finally:
        for proc in reversed(processes):
            proc.terminate()
        for proc in reversed(processes):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    echo(
        f"queue benchmark ({uploads} images, bank of {bank_size}, {concurrency} worker "
        f"process(es), broker: {report['broker']}, CPU {os.cpu_count()} cores, load "
        f"{report['load_1min'][0]} -> {report['load_1min'][1]})"
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
    return report
