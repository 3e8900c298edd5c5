"""Measure :class:`moderation.banks.vpdq_scan.VpdqScan`: building the scan of a bank of vPDQ
entries and matching one upload's signature against it (a linear scan over every frame).

Usage (from the repository root)::

    PYTHONPATH=$PWD python scripts/bench_vpdq_scan.py [ENTRIES] [FRAMES_PER_ENTRY]

Digests are random (seed 0, quality 90); the query is entry 5's frames, so it matches that
entry 100 %. Prints the build time and the median of 5 searches. Not a pytest: a measurement
tool, run by hand.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from moderation.banks.vpdq_scan import VpdqScan
from moderation.signals.vpdq import VpdqFeature


def main(entries: int = 10_000, frames: int = 60) -> None:
    """Build a scan of ``entries`` x ``frames`` random frames and time searches."""
    rng = np.random.default_rng(0)
    owners = np.repeat(np.arange(entries, dtype=np.int64), frames)
    digests = rng.integers(0, 256, (entries * frames, 32), dtype=np.uint8)
    start = time.perf_counter()
    scan = VpdqScan(owners, digests, np.full(len(owners), 90, np.uint8))
    build = time.perf_counter() - start
    query = [
        VpdqFeature(i, 90, digests[5 * frames + i].tobytes().hex(), float(i)) for i in range(frames)
    ]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        found = scan.search(query)
        times.append(time.perf_counter() - start)
    assert found[0][0] == 5 and found[0][1].query_match_percent == 100.0
    print(
        f"{entries} entries x {frames} frames: build {build:.2f} s, "
        f"search median {np.median(times) * 1000:.0f} ms (5 runs)"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
