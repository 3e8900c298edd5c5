"""Cold random row reads on this machine's disk: how long ``R`` scattered 2,576-byte rows (an
``ivf_disk`` row at 1280-d, float16 + tag) take to read after the file is dropped from the page
cache, by strategy: ``POSIX_FADV_WILLNEED`` for all then sequential ``pread`` (what
:meth:`moderation.banks.rowfile.RowFile.read` does), plain sequential ``pread``, 8 threads, and
``preadv(RWF_NOWAIT)`` taking the rows already cached first.

Usage (any large file that is not being written, e.g. an ``ivf_disk`` row file)::

    python scripts/bench_row_reads.py FILE [TRIALS]

Prints p50/p99 ms per query-sized batch for 320, 160, 80 and 40 rows, and the load average.
Not a pytest: a measurement tool, run by hand (Linux only).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROW = 2576
HEADER = 32


def strategies(fd: int, pool: ThreadPoolExecutor) -> dict[str, Callable[[list[int]], object]]:
    """Name -> function reading the given rows of ``fd``."""

    def sequential(rows: list[int]) -> list[bytes]:
        return [os.pread(fd, ROW, HEADER + r * ROW) for r in rows]

    def prefetched(rows: list[int]) -> list[bytes]:
        for r in rows:
            os.posix_fadvise(fd, HEADER + r * ROW, ROW, os.POSIX_FADV_WILLNEED)
        return sequential(rows)

    def threads(rows: list[int]) -> list[list[bytes]]:
        return list(pool.map(sequential, [rows[i::8] for i in range(8)]))

    def nowait(rows: list[int]) -> bytearray:
        buffer = bytearray(ROW * len(rows))
        view = memoryview(buffer)
        missing = []
        for i, r in enumerate(rows):
            try:
                ready = os.preadv(
                    fd, [view[i * ROW : (i + 1) * ROW]], HEADER + r * ROW, os.RWF_NOWAIT
                )
            except BlockingIOError:
                ready = 0
            if ready != ROW:
                missing.append(i)
        for i in missing:
            os.posix_fadvise(fd, HEADER + rows[i] * ROW, ROW, os.POSIX_FADV_WILLNEED)
        for i in missing:
            os.preadv(fd, [view[i * ROW : (i + 1) * ROW]], HEADER + rows[i] * ROW)
        return buffer

    return {
        "willneed+pread": prefetched,
        "pread": sequential,
        "8 threads": threads,
        "RWF_NOWAIT": nowait,
    }


def main(path: str, trials: int) -> None:
    """Measure and print (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY)
    rows_in_file = (os.fstat(fd).st_size - HEADER) // ROW
    rng = np.random.default_rng(1)
    with ThreadPoolExecutor(8) as pool:
        named = strategies(fd, pool)
        for depth in (320, 160, 80, 40):
            times: dict[str, list[float]] = {name: [] for name in named}
            for _ in range(trials):
                for name, read in named.items():  # interleaved: the same minute's disk
                    rows = np.sort(rng.choice(rows_in_file, depth, replace=False)).tolist()
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    started = time.perf_counter()
                    read(rows)
                    times[name].append((time.perf_counter() - started) * 1000)
            print(
                f"{depth} rows: "
                + "; ".join(
                    f"{name} p50 {np.percentile(t, 50):.2f} p99 {np.percentile(t, 99):.2f} ms"
                    for name, t in times.items()
                ),
                flush=True,
            )
    os.close(fd)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
