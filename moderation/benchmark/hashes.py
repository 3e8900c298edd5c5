"""``moderation benchmark hashes``: importing large PDQ hash lists and looking digests up.

For each size n (default 100,000 and 1,000,000), in a fresh data directory:

``import``   a generated n-line ThreatExchange list (``pdq <hex>`` per line) goes through
             :func:`moderation.banks.hash_import.import_hash_list` (parse, bulk insert, one
             encrypted snapshot version, audit event), timed whole: lines/s.
``load``     the worker's :func:`moderation.banks.blocklist.load_blocklist` of that snapshot
             (decrypt, build the PDQ index), s.
``lookup``   single-digest searches of the bank's PDQ index at radius 31 (ThreatExchange's
             ``PDQ_CONFIDENT_MATCH_THRESHOLD``), one query at a time: p50/p99 ms, and recall of
             the planted near duplicates (every query is a listed digest with 0-31 bits
             flipped, so each must be found) beside unrelated digests (nothing within 31 bits
             expected).

Generated digests follow PDQ's bit statistics: PDQ thresholds each of its 256 DCT coefficients
at their median (Meta's PDQ hashing paper, "The TMK+PDQF video-hashing and PDQ image-hashing
algorithms", 2019), so every digest has 128 bits set; different images give near-independent
bits, i.e. distances around 128 +/- 8. A tenth of the list are near duplicates of other entries
(1-12 bits apart), as real lists of edited copies are.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from moderation.config import Settings, load_settings

Echo = Callable[[str], None]

PDQ_BITS: Final = 256
LOOKUP_RADIUS: Final = 31
QUERIES: Final = 2_000
WARMUP_QUERIES: Final = 50
NEAR_DUPLICATE_SHARE: Final = 0.1
SEED: Final = 20261205


def generate_digests(n: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """``n`` PDQ-like digests, uint8 (n, 32): 128 bits set each; a tenth of them are 1-12 bits
    from another digest of the set."""
    half = np.repeat(np.array([0, 1], np.uint8), PDQ_BITS // 2)
    bits = rng.permuted(np.tile(half, (n, 1)), axis=1)
    near = rng.choice(n, size=int(n * NEAR_DUPLICATE_SHARE), replace=False)
    sources = rng.integers(0, n, size=len(near))
    for row, source in zip(near.tolist(), sources.tolist(), strict=True):
        bits[row] = bits[source]
        flips = rng.choice(PDQ_BITS, size=int(rng.integers(1, 13)), replace=False)
        bits[row, flips] ^= 1
    packed: npt.NDArray[np.uint8] = np.packbits(bits, axis=1)
    return packed


def flipped(digest: npt.NDArray[np.uint8], count: int, rng: np.random.Generator) -> bytes:
    """``digest`` (uint8 (32,)) with ``count`` distinct bits flipped."""
    bits = np.unpackbits(digest)
    bits[rng.choice(PDQ_BITS, size=count, replace=False)] ^= 1
    return np.packbits(bits).tobytes()


def write_list(path: Path, digests: npt.NDArray[np.uint8]) -> None:
    """Write ``digests`` as a ThreatExchange signal file (``pdq <hex>`` per line)."""
    with path.open("w", encoding="ascii") as out:
        for row in digests:
            out.write(f"pdq {row.tobytes().hex()}\n")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _lookups(
    index: Any, digests: npt.NDArray[np.uint8], rng: np.random.Generator
) -> dict[str, float]:
    """Time single-digest searches: planted near duplicates (must be found) and unrelated
    digests; returns p50/p99 ms and the recall of the planted ones."""
    picks = rng.integers(0, len(digests), size=QUERIES)
    planted = [flipped(digests[i], int(rng.integers(0, LOOKUP_RADIUS + 1)), rng) for i in picks]
    unrelated = [row.tobytes() for row in generate_digests(QUERIES // 4, rng)]
    queries = [(q, True) for q in planted] + [(q, False) for q in unrelated]
    order = rng.permutation(len(queries))
    for q, _ in queries[:WARMUP_QUERIES]:
        index.search(np.frombuffer(q, np.uint8)[None, :], 10, LOOKUP_RADIUS)
    times: list[float] = []
    found = 0
    for i in order.tolist():
        query, is_planted = queries[i]
        start = time.perf_counter()
        (hits,) = index.search(np.frombuffer(query, np.uint8)[None, :], 10, LOOKUP_RADIUS)
        times.append((time.perf_counter() - start) * 1000.0)
        if is_planted:
            found += bool(hits)
    return {
        "p50_ms": _percentile(times, 50),
        "p99_ms": _percentile(times, 99),
        "recall": found / len(planted),
        "queries": float(len(queries)),
    }


def bench_size(n: int, base: Settings, echo: Echo) -> dict[str, Any]:
    """Import, load and look up one generated list of ``n`` digests (see the module docstring)."""
    from moderation.banks.blocklist import load_blocklist
    from moderation.banks.hash_import import import_hash_list
    from moderation.banks.records import create_bank
    from moderation.service.runtime import prepared_runtime
    from moderation.storage.db import transaction

    rng = np.random.default_rng(SEED + n)
    work = Path(tempfile.mkdtemp(prefix=f"moderation-hashes-{n}-"))
    digests = generate_digests(n, rng)
    listing = work / "list.txt"
    write_list(listing, digests)
    settings = load_settings(
        **{
            **base.model_dump(exclude={"data_dir", "database_url", "key_file", "master_keys"}),
            "data_dir": work / "var",
            "classifier": False,
        }
    )
    runtime = prepared_runtime(settings)
    encoder = runtime.encoder  # its id stamps the snapshot: load it outside the timings
    with transaction(runtime.sessions) as session:
        create_bank(session, "bench-list")
    start = time.perf_counter()
    report = import_hash_list(runtime, "bench-list", listing, actor="benchmark")
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    with runtime.sessions() as session:
        blocklist = load_blocklist(
            session,
            runtime.keyring,
            settings.snapshots_dir,
            encoder_id=str(encoder.id),
            dim=encoder.dim,
        )
    load_s = time.perf_counter() - start
    lookups = _lookups(blocklist.pdq, digests, rng)
    snapshot_bytes = sum(p.stat().st_size for p in settings.snapshots_dir.glob("*.snapshot"))
    row = {
        "lines": n,
        "added": report.added,
        "merged": report.merged,
        "import_s": import_s,
        "lines_per_s": n / import_s,
        "load_s": load_s,
        "snapshot_bytes": snapshot_bytes,
        "index": blocklist.pdq.params,
        **lookups,
    }
    runtime.engine.dispose()
    echo(
        f"hash list {n:>11,}: import {import_s:.1f} s = {n / import_s:,.0f} lines/s "
        f"({report.added:,} added, {report.merged:,} merged); load {load_s:.2f} s; "
        f"lookup r={LOOKUP_RADIUS} p50 {lookups['p50_ms']:.3f} ms p99 {lookups['p99_ms']:.3f} "
        f"ms, recall {lookups['recall']:.4f}; snapshot {snapshot_bytes / n:.0f} B/entry"
    )
    return row


def run_hash_benchmark(settings: Settings, sizes: Sequence[int], echo: Echo) -> dict[str, Any]:
    """Every size of :func:`bench_size`, with the machine it ran on."""
    import platform

    rows = [bench_size(n, settings, echo) for n in sizes]
    medians = {
        "lines_per_s": statistics.median(r["lines_per_s"] for r in rows) if rows else None,
    }
    return {"machine": platform.processor() or platform.machine(), "sizes": rows, **medians}
