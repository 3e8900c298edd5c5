"""Figures and tables of ``moderation benchmark load`` (see :mod:`moderation.benchmark.load`)."""

from __future__ import annotations

import os
import platform
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moderation.benchmark.load_images import PoolImage
    from moderation.benchmark.load_phase import LiveProbe, Post

STATUS_COLUMNS = ("202", "200", "429", "503", "other")
MIB = 1024 * 1024


def machine_figures() -> dict[str, Any]:
    """CPU count, the CPU model (``/proc/cpuinfo``) and the 1-minute load average."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "load_1min": round(os.getloadavg()[0], 2)}


def _percentile(values: Sequence[float], q: float, digits: int) -> float | None:
    """The ``q``-th percentile (numpy's linear interpolation); None without values."""
    return round(float(np.percentile(values, q)), digits) if len(values) else None


def _status_counts(posts: Sequence[Post]) -> dict[str, int]:
    counts = dict.fromkeys(STATUS_COLUMNS, 0)
    for post in posts:
        key = str(post.status)
        counts[key if key in counts else "other"] += 1
    return counts


def _live_figures(probe: LiveProbe | None) -> dict[str, Any] | None:
    if probe is None:
        return None
    return {
        "probes": len(probe.latencies_ms),
        "failures": probe.failures,
        "p50_ms": _percentile(probe.latencies_ms, 50, 1),
        "max_ms": round(max(probe.latencies_ms), 1) if probe.latencies_ms else None,
    }


def phase_figures(
    posts: Sequence[Post],
    done: dict[str, tuple[str, float]],
    pool: Sequence[PoolImage],
    peaks: dict[str, int],
    probe: LiveProbe | None,
) -> dict[str, Any]:
    """A phase's figures from its requests, the results found for the accepted ones
    (``{upload id: (decision, unix time recorded)}``), the peak RSS per component (bytes) and
    the ``/status/live`` probe (None: not probed).

    ``lost``: accepted, no result by the end of the drain; ``wrong``: a result outside the
    pool image's expected decisions (``wrong_kinds`` says which images and decisions).
    """
    accepted = [p for p in posts if p.accepted]
    results = [(p, done[p.upload_id]) for p in accepted if p.upload_id in done]
    wrong = Counter(
        f"{pool[p.image].kind} -> {decision}"
        for p, (decision, _) in results
        if decision not in pool[p.image].expected
    )
    to_result = [recorded - p.sent_at for p, (_, recorded) in results]
    return {
        "requests": len(posts),
        "status": _status_counts(posts),
        "accepted": len(accepted),
        "refused": len(posts) - len(accepted),
        "post_p50_ms": _percentile([p.latency_ms for p in accepted], 50, 1),
        "post_p99_ms": _percentile([p.latency_ms for p in accepted], 99, 1),
        "max_start_lag_ms": round(max((p.start_lag_ms for p in posts), default=0.0), 1),
        "result_p50_s": _percentile(to_result, 50, 2),
        "result_p99_s": _percentile(to_result, 99, 2),
        "finished": len(results),
        "lost": len(accepted) - len(results),
        "wrong": sum(wrong.values()),
        "wrong_kinds": dict(wrong),
        "decisions": dict(Counter(decision for _, (decision, _) in results)),
        "peak_rss_mb": {name: round(value / MIB, 1) for name, value in peaks.items()},
        "live": _live_figures(probe),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _rows(phases: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per phase) for every printed figure."""

    def row(label: str, get: Callable[[dict[str, Any]], Any]) -> tuple[str, list[str]]:
        return label, [_cell(get(figures)) for figures in phases.values()]

    rows = [
        row("offered uploads/s", lambda f: f["offered_per_s"]),
        row("per-client limit", lambda f: f["client_limit"] or "lifted"),
        row("requests sent", lambda f: f["requests"]),
        row("sent uploads/s (achieved)", lambda f: f["sent_per_s"]),
    ]
    for code in STATUS_COLUMNS:
        rows.append((f"HTTP {code}", [str(f["status"][code]) for f in phases.values()]))
    rows += [
        row("accepted / refused", lambda f: f"{f['accepted']} / {f['refused']}"),
        row("accepted POST p50 / p99 ms", lambda f: f"{f['post_p50_ms']} / {f['post_p99_ms']}"),
        row("upload-to-result p50 / p99 s", lambda f: f"{f['result_p50_s']} / {f['result_p99_s']}"),
        row("lost", lambda f: f["lost"]),
        row("wrong", lambda f: f["wrong"]),
        row("drain after sending, s", lambda f: f["drain_s"]),
        row("max start lag ms", lambda f: f["max_start_lag_ms"]),
        row("peak RSS web MiB", lambda f: f["peak_rss_mb"]["web"]),
        row("peak RSS worker MiB", lambda f: f["peak_rss_mb"]["worker"]),
        row("peak RSS redis MiB", lambda f: f["peak_rss_mb"]["redis"]),
        row("/status/live max ms", lambda f: (f["live"] or {}).get("max_ms")),
    ]
    return rows


def echo_tables(report: dict[str, Any], echo: Callable[[str], None]) -> None:
    """One table per database (a figure per row, a phase per column), through ``echo``."""
    from rich.console import Console
    from rich.table import Table

    machine = report["machine"]
    options = report["options"]
    echo(
        f"load benchmark: {options['duration']:g} s per phase, {options['clients']} clients, "
        f"1 worker, serve --worker-class {options.get('worker_class')}, queue bound "
        f"{options.get('queue_max_depth')}; {machine['cpus']} CPUs ({machine['cpu']}), load "
        f"{machine['load_1min']} -> {machine.get('load_1min_after')}"
    )
    console = Console(width=110, color_system=None, force_terminal=False, highlight=False)
    for database, figures in report["databases"].items():
        phases = figures["phases"]
        table = Table(title=f"{database}", title_justify="left")
        table.add_column("figure")
        for name in phases:
            table.add_column(name, justify="right")
        for label, cells in _rows(phases):
            table.add_row(label, *cells)
        with console.capture() as capture:
            console.print(table)
        echo(capture.get().rstrip("\n"))
        for name, phase in phases.items():
            if phase["wrong_kinds"]:
                echo(f"  wrong in {name}: {phase['wrong_kinds']}")
