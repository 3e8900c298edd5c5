"""PDQ Hamming index at bank scale: the flat scan against multi-index hashing.

For each bank size (default 100k and 1M entries), :func:`run_hamming_benchmark` builds
:class:`~moderation.banks.index.HammingIndex` both ways (``algorithm="flat"`` and ``"mih"``) over
the same generated digests and reports build time, serialized bytes per entry, resident memory
added by the build, load time from the serialized bytes, single-query latency p50/p99 at radius 31
(the PDQ threshold) and 52 (which multi-index hashing answers by scanning its stored digests),
whether both indexes return identical hits for every query, and how many planted near-duplicates
were found.

Digests are independent fair bits: two unrelated PDQ hashes then differ in Binomial(256, 1/2)
bits (128 +- 8), near the distances reported for unrelated real photos in the PDQ paper
(Facebook, "The TMK+PDQF and PDQ hashing algorithms", 2019). Real hashes have correlated bits,
which makes some 16-bit chunks more common and their hash buckets fuller than the ``n / 65536``
of fair bits, so the multi-index latency here is a lower bound. Planted near-duplicates: each of
the first half of the queries has copies in the bank at four distances drawn from 0..31 and one
from 32..52; the other half are unrelated digests.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import faiss
import numpy as np
import numpy.typing as npt

from moderation.banks.index import HammingIndex, Hit
from moderation.signals.pdq import PDQ_DIGEST_BYTES

Echo = Callable[[str], None]

QUERIES: Final = 500
WARMUP_QUERIES: Final = 20
#: Near-duplicates planted per near-duplicate query: this many within 31 bits, one beyond.
PLANTED_WITHIN: Final = 4
#: Hits returned per query when comparing the two indexes: more than any query has.
COMPARE_K: Final = 1000
PDQ_RADIUS: Final = 31
WIDE_RADIUS: Final = 52
SEED: Final = 20260512


def run_hamming_benchmark(
    sizes: Sequence[int], echo: Echo, *, omp_threads: int | None = None
) -> list[dict[str, Any]]:
    """Measure flat against multi-index hashing at each bank size in ``sizes`` (entries).

    ``omp_threads``: FAISS OpenMP threads during the run (restored afterwards); ``None`` keeps
    FAISS's default, one per core. On a loaded 2-core machine two threads per single query
    stretch the tail: threads wait at OpenMP barriers for a core, so p99 then measures the
    scheduler more than the index; 1 shows the index alone.

    Prints one block per size through ``echo`` and returns one row per size and algorithm:
    ``n``, ``algorithm``, ``omp_threads``, ``build_s``, ``bytes_per_entry`` (serialized),
    ``rss_mb`` (resident memory the build added, MB; 0 where ``/proc`` is absent), ``load_s``,
    ``p50_ms``/``p99_ms`` (radius 31), ``p50_wide_ms``/``p99_wide_ms`` (radius 52), ``agree``
    (identical hits to the flat index at both radii, for every query; always true for flat)
    and ``planted_found`` (fraction of planted near-duplicates within 31 bits returned at
    radius 31).
    """
    previous = faiss.omp_get_max_threads()
    if omp_threads is not None:
        faiss.omp_set_num_threads(omp_threads)
    try:
        return _run(sizes, echo)
    finally:
        faiss.omp_set_num_threads(previous)


def _run(sizes: Sequence[int], echo: Echo) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    threads = faiss.omp_get_max_threads()
    for n in sizes:
        echo(f"hamming: {n:,} entries (fair bits, planted near-duplicates), {threads} thread(s)")
        ids, digests, queries, planted = generate_bank(n, np.random.default_rng(SEED + n))
        flat_hits: dict[int, list[list[Hit]]] = {}
        for algorithm in ("flat", "mih"):
            row, hits = _bench_algorithm(algorithm, ids, digests, queries, planted)
            if algorithm == "flat":
                flat_hits = hits
            row["omp_threads"] = threads
            row["agree"] = all(hits[r] == flat_hits[r] for r in (PDQ_RADIUS, WIDE_RADIUS))
            rows.append(row)
            echo(
                f"  {algorithm:4}  build {row['build_s']:6.2f} s  "
                f"{row['bytes_per_entry']:5.1f} B/entry serialized  "
                f"+{row['rss_mb']:6.1f} MB resident  load {row['load_s']:5.2f} s  "
                f"r31 p50 {row['p50_ms']:7.3f} ms p99 {row['p99_ms']:7.3f} ms  "
                f"r52 p50 {row['p50_wide_ms']:7.3f} ms p99 {row['p99_wide_ms']:7.3f} ms  "
                f"planted found {row['planted_found']:.3f}  "
                f"agrees with flat: {'yes' if row['agree'] else 'NO'}"
            )
    return rows


def generate_bank(
    n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.uint8], dict[int, int]]:
    """``n`` entries: ids ``(n,)`` int64, digests ``(n, 32)`` uint8 (planted near-duplicates
    included, see the module docstring), queries ``(QUERIES, 32)`` uint8 and the planted entries
    within 31 bits as ``{id: query row}``.
    """
    queries = rng.integers(0, 256, size=(QUERIES, PDQ_DIGEST_BYTES), dtype=np.uint8)
    near_rows = QUERIES // 2
    per_query = PLANTED_WITHIN + 1
    planted_count = min(n, near_rows * per_query)
    digests = rng.integers(0, 256, size=(n, PDQ_DIGEST_BYTES), dtype=np.uint8)
    planted: dict[int, int] = {}
    slots = rng.choice(n, size=planted_count, replace=False)
    for slot_no, slot in enumerate(slots.tolist()):
        row, which = divmod(slot_no, per_query)
        within = which < PLANTED_WITHIN
        distance = int(rng.integers(0, PDQ_RADIUS + 1) if within else rng.integers(32, 53))
        digests[slot] = _flip(rng, queries[row], distance)
        if within:
            planted[slot] = row
    return np.arange(n, dtype=np.int64), digests, queries, planted


def _flip(
    rng: np.random.Generator, digest: npt.NDArray[np.uint8], count: int
) -> npt.NDArray[np.uint8]:
    bits = np.unpackbits(digest)
    bits[rng.choice(bits.size, size=count, replace=False)] ^= 1
    return np.packbits(bits)


def _bench_algorithm(
    algorithm: Literal["flat", "mih"],
    ids: npt.NDArray[np.int64],
    digests: npt.NDArray[np.uint8],
    queries: npt.NDArray[np.uint8],
    planted: dict[int, int],
) -> tuple[dict[str, Any], dict[int, list[list[Hit]]]]:
    n = len(ids)
    rss_before = _rss_mb()
    start = time.perf_counter()
    index = HammingIndex.build(ids, digests, algorithm=algorithm)
    build_s = time.perf_counter() - start
    rss_mb = _rss_mb() - rss_before
    serialized = index.serialize()
    start = time.perf_counter()
    HammingIndex.deserialize(serialized)
    load_s = time.perf_counter() - start
    row: dict[str, Any] = {
        "n": n,
        "algorithm": algorithm,
        "build_s": build_s,
        "bytes_per_entry": len(serialized) / max(n, 1),
        "rss_mb": rss_mb,
        "load_s": load_s,
    }
    hits: dict[int, list[list[Hit]]] = {}
    for radius, suffix in ((PDQ_RADIUS, ""), (WIDE_RADIUS, "_wide")):
        latencies, hits[radius] = _timed(index, queries, radius)
        row[f"p50{suffix}_ms"] = float(np.percentile(latencies, 50))
        row[f"p99{suffix}_ms"] = float(np.percentile(latencies, 99))
    found = sum(
        any(h.id == entry for h in hits[PDQ_RADIUS][query]) for entry, query in planted.items()
    )
    row["planted_found"] = found / max(len(planted), 1)
    return row, hits


def _timed(
    index: HammingIndex, queries: npt.NDArray[np.uint8], radius: int
) -> tuple[list[float], list[list[Hit]]]:
    """Single-query latencies (ms) after an untimed warm-up, and every query's hits."""
    for row in range(WARMUP_QUERIES):
        index.search(queries[row : row + 1], COMPARE_K, radius)
    latencies: list[float] = []
    results: list[list[Hit]] = []
    for row in range(len(queries)):
        start = time.perf_counter()
        hits = index.search(queries[row : row + 1], COMPARE_K, radius)[0]
        latencies.append((time.perf_counter() - start) * 1e3)
        results.append(hits)
    return latencies, results


def _rss_mb() -> float:
    """This process's resident memory now, MB (``/proc/self/statm``; 0 where absent), after
    handing freed heap back to the system (glibc ``malloc_trim``) so that an earlier index's
    freed memory does not hide a new one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
