"""``moderation benchmark speed``'s whole-process section: ``moderation screen`` timed as a
command, start-up included, as an operator runs it (issue 20).

Against a data directory with a bank of the first ``bank_size`` photos, it runs, alternating
so that load drifts hit both: ``moderation screen --json`` of one photo (the start-up: interpreter,
imports, key ring, snapshot, encoder load, one screening, output) and of ``screen_count``
photos. Each run's wall time is a monotonic clock around the child, its CPU time the user +
system seconds of the child's process tree (``getrusage(RUSAGE_CHILDREN)`` before and after),
its peak RSS the ``VmHWM`` the child reports at exit. Reported: medians, the marginal rate
``(screen_count - 1) / (t_many - t_one)`` images/s, the marginal CPU time per photo and the
rate it allows on this machine's cores when nothing else runs (``cpus / cpu_per_photo``: the
figure to compare on a shared, loaded machine, where wall times mean little),
``moderation --help``'s wall and CPU time, and the CPU model the figures came from.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moderation.config import Settings

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_runtime(paths: Sequence[Path], settings: Settings, bank_size: int) -> Runtime:
    """A runtime over a new temporary data directory with the bank ``bench`` of the first
    ``bank_size`` of ``paths`` (encoder settings taken from ``settings``)."""
    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.config import load_settings
    from moderation.service.runtime import prepared_runtime
    from moderation.storage.db import transaction

    work = Path(tempfile.mkdtemp(prefix="moderation-speed-"))
    values = {
        "data_dir": work / "var",
        "encoder": settings.encoder,
        "device": settings.device,
        "encoder_runtime": settings.encoder_runtime,
        "master_keys": None,
    }
    runtime = prepared_runtime(load_settings(**values))
    with transaction(runtime.sessions) as session:
        create_bank(session, "bench")
    import_bank(runtime, "bench", list(paths[:bank_size]), actor="benchmark")
    return runtime


#: Runs ``python -m moderation`` and, at exit, writes the process's peak RSS (``VmHWM`` of
#: ``/proc/self/status``, kB) to stderr. Not ``ru_maxrss``: a child forked from a large parent
#: (a test run with torch loaded) inherits the parent's high-water mark across ``exec``.
_PEAK_WRAPPER = """
import atexit, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('\\nVmHWM ' + line.split()[1] + '\\n')
atexit.register(_peak)
sys.argv[0] = 'moderation'
runpy.run_module('moderation', run_name='__main__', alter_sys=True)
"""


def moderation_command() -> list[str]:
    """``python -m moderation`` that reports its peak RSS (see :func:`run_child`)."""
    return [sys.executable, "-c", _PEAK_WRAPPER]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``argv`` (a :func:`moderation_command` plus arguments; output discarded) and return
    (wall seconds, peak RSS in MB, CPU seconds: user + system of the child and its children).

    Raises:
        RuntimeError: the command exited non-zero.
    """
    cpu_start = _children_cpu_s()
    start = time.perf_counter()
    result = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        list(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    wall = time.perf_counter() - start
    cpu = _children_cpu_s() - cpu_start
    errors = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"moderation {argv[3:5]} exited {result.returncode}: {errors[-500:]}")
    peaks = [line.split()[1] for line in errors.splitlines() if line.startswith("VmHWM ")]
    return wall, (int(peaks[-1]) / 1024.0 if peaks else float("nan")), cpu


def bench_process(
    paths: Sequence[Path],
    settings: Settings,
    *,
    bank_size: int,
    screen_count: int,
    repeats: int,
) -> dict[str, Any]:
    """The whole-process figures of ``moderation screen`` (see the module docstring)."""
    runtime = bench_runtime(paths, settings, bank_size)
    data_dir = runtime.settings.resolved_data_dir
    runtime.engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(MODERATION_DATA_DIR=str(data_dir), MODERATION_LOG_LEVEL="WARNING")
    env.update(
        MODERATION_ENCODER=settings.encoder,
        MODERATION_DEVICE=settings.device,
        MODERATION_ENCODER_RUNTIME=settings.encoder_runtime,
    )
    command = moderation_command()
    many = [str(p) for p in paths[:screen_count]]
    one_runs, many_runs, help_runs = [], [], []
    run_child([*command, "screen", "--json", many[0]], env)  # warm-up: page cache
    for _ in range(repeats):
        one_runs.append(run_child([*command, "screen", "--json", many[0]], env))
        many_runs.append(run_child([*command, "screen", "--json", *many], env))
        help_runs.append(run_child([*command, "--help"], env))
    one_s = statistics.median(run[0] for run in one_runs)
    many_s = statistics.median(run[0] for run in many_runs)
    one_cpu = statistics.median(run[2] for run in one_runs)
    many_cpu = statistics.median(run[2] for run in many_runs)
    cpus = len(os.sched_getaffinity(0))
    cpu_per_photo = max(many_cpu - one_cpu, 1e-9) / max(len(many) - 1, 1)
    return {
        "cpu_model": cpu_model(),
        "cpus": cpus,
        "load_average": round(os.getloadavg()[0], 2),
        "startup_one_photo_s": round(one_s, 3),
        "startup_cpu_s": round(one_cpu, 3),
        "startup_peak_rss_mb": round(statistics.median(run[1] for run in one_runs), 1),
        "screen_photos": len(many),
        "screen_s": round(many_s, 3),
        "screen_cpu_s": round(many_cpu, 3),
        "screen_peak_rss_mb": round(statistics.median(run[1] for run in many_runs), 1),
        "images_per_s": round(len(many) / many_s, 1),
        "marginal_images_per_s": round((len(many) - 1) / max(many_s - one_s, 1e-9), 1),
        "marginal_cpu_ms_per_photo": round(1000 * cpu_per_photo, 2),
        "marginal_images_per_s_from_cpu": round(cpus / cpu_per_photo, 1),
        "help_s": round(statistics.median(run[0] for run in help_runs), 3),
        "help_cpu_s": round(statistics.median(run[2] for run in help_runs), 3),
        "bank": bank_size,
        "repeats": repeats,
    }


def describe(row: dict[str, Any]) -> list[str]:
    """The report lines of :func:`bench_process`'s row."""
    return [
        f"  moderation screen, whole process ({row['cpu_model']}, {row['cpus']} CPUs, "
        f"load {row['load_average']}, median of {row['repeats']}; wall s / CPU s):",
        f"    start-up, one photo        {row['startup_one_photo_s']:>8.2f} s "
        f"{row['startup_cpu_s']:>7.2f} s   peak RSS {row['startup_peak_rss_mb']:.0f} MB",
        f"    {row['screen_photos']} photos, bank {row['bank']:<6}   {row['screen_s']:>8.2f} s "
        f"{row['screen_cpu_s']:>7.2f} s   peak RSS {row['screen_peak_rss_mb']:.0f} MB   "
        f"{row['images_per_s']} images/s, marginal {row['marginal_images_per_s']} images/s",
        f"    marginal CPU per photo     {row['marginal_cpu_ms_per_photo']:>8.2f} ms "
        f"-> {row['marginal_images_per_s_from_cpu']} images/s on {row['cpus']} idle cores",
        f"    moderation --help          {row['help_s']:>8.2f} s {row['help_cpu_s']:>7.2f} s",
    ]
