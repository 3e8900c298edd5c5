"""The ``index`` section of ``moderation benchmark speed``: the bank index at scale.

At each bank size (default 100k and 1M): single-query latency p50/p99 of the index
``CosineIndex.build`` chooses (``ivf_pca``) against exact search (FAISS ``IndexFlatIP`` over the
full 1280-d vectors), recall@10 against exact search (strict, and ann-benchmarks' tolerant form:
a hit counts when its true cosine is within 1e-3 of the true 10th), build time, bytes per entry,
and the encrypted bank snapshot's load time (read, SHA-256, decrypt, parse, zero-copy index
load; the payload :func:`~moderation.banks.versions.commit_signals` writes, without the
classifier stage's region vectors) against building the index at load (what a worker did before
snapshots carried the index).

Bank vectors are generated from real embeddings, because no real million-image bank exists
here: the benchmark photos and three edits of each (mirror, centre crop 75%, greyscale) are
embedded; each generated entry is a Dirichlet(0.5) mixture of 4 random real embeddings plus
isotropic Gaussian noise of norm 0.1, normalised. Queries are 200 generated entries perturbed
by noise of norm 0.3 (edited copies); the first 20 are searched once untimed first (a serving
worker's index is warm), then all 200 are timed. The vectors are generated in seeded chunks and
never held all at once at full width (1M x 1280 float32 would be 5 GB): ground truth is an exact
chunked scan, and the exact single-query baseline at sizes above :data:`EXACT_TIMING_MAX` is the
measured time over one chunk times the number of chunks. 10M is extrapolated from the 100k and
1M figures (:func:`extrapolate`): bytes and load time linearly in n; ``ivf_pca`` latency times
sqrt(10) (its lists number about sqrt(n), so the centroids compared and the entries scanned per
query both grow with sqrt(n)), HNSW latency by adding the 100k -> 1M increase once more (HNSW
search grows about with log n).
"""

from __future__ import annotations

import itertools
import os
import resource
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from moderation.banks.index import CosineIndex

CHUNK: Final = 20_000
EXACT_TIMING_MAX: Final = 200_000
QUERIES: Final = 200
WARMUP_QUERIES: Final = 20
MIX: Final = 4
ENTRY_NOISE: Final = 0.1
QUERY_NOISE: Final = 0.3
SEED: Final = 20240607

Echo = Callable[[str], None]


def real_embeddings(images: Sequence[Image.Image], encode: Callable[..., Any]) -> np.ndarray:
    """Embeddings of ``images`` and of three edits of each (mirror, centre crop 75%, grey)."""
    variants: list[Image.Image] = []
    for image in images:
        w, h = image.size
        variants += [
            image,
            ImageOps.mirror(image),
            image.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
            ImageOps.grayscale(image).convert("RGB"),
        ]
    return np.asarray(encode(variants), dtype=np.float32)


class Generator:
    """Seeded, chunked bank vectors from real embeddings (see the module docstring)."""

    def __init__(self, real: npt.NDArray[np.float32]) -> None:
        self.real = real
        self.dim = real.shape[1]

    def chunk(self, start: int, count: int) -> npt.NDArray[np.float32]:
        """Entries ``start`` .. ``start + count - 1`` (the same for the same arguments)."""
        rng = np.random.default_rng((SEED, start))
        picks = rng.integers(0, len(self.real), (count, MIX))
        weights = rng.dirichlet(np.full(MIX, 0.5), count).astype(np.float32)
        out = rng.standard_normal((count, self.dim), dtype=np.float32)
        out *= ENTRY_NOISE / np.sqrt(self.dim)
        for k in range(MIX):
            out += weights[:, k, None] * self.real[picks[:, k]]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def chunks(self, n: int) -> Any:
        for start in range(0, n, CHUNK):
            yield start, self.chunk(start, min(CHUNK, n - start))


def _queries(gen: Generator, n: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng((SEED, n, 1))
    sources = np.sort(rng.choice(n, QUERIES, replace=False))
    picked = []
    for start, block in gen.chunks(n):
        inside = sources[(sources >= start) & (sources < start + len(block))]
        if inside.size:
            picked.append(block[inside - start])
    queries = np.concatenate(picked)
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * (
        QUERY_NOISE / np.sqrt(gen.dim)
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32)


def _exact(gen: Generator, n: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (cosines, ids) of ``queries`` over the ``n`` generated entries."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    for start, block in gen.chunks(n):
        scores = queries @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        merged = np.concatenate([best, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids], axis=1)
        order = np.argsort(-merged, axis=1)[:, :k]
        best = np.take_along_axis(merged, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best, best_ids


def _exact_latency(gen: Generator, n: int, queries: np.ndarray) -> list[float]:
    """Single-query latency (ms) of exact FAISS ``IndexFlatIP`` over ``n`` full-width entries;
    above :data:`EXACT_TIMING_MAX` entries, one chunk's time times the number of chunks."""
    import faiss

    size = min(n, EXACT_TIMING_MAX)
    flat = faiss.IndexFlatIP(gen.dim)
    for _, block in gen.chunks(size):
        flat.add(block)
    scale = n / size
    times = []
    for query in queries[:50]:
        start = time.perf_counter()
        flat.search(query[None, :], 10)
        times.append((time.perf_counter() - start) * 1000.0 * scale)
    return times


def _snapshot_load(serialized: bytes, n: int, work: Path) -> tuple[float, int]:
    """Seconds to read, decrypt, parse and load an encrypted bank snapshot of ``n`` active
    entries holding the built index (as :func:`moderation.banks.versions.commit_signals`
    writes it: ids, PDQ digests, the index, the global vectors kept only in the index; no
    region vectors, which only the classifier stage adds), and the file's size in bytes."""
    from moderation.banks.index import CosineIndex, load_index
    from moderation.banks.snapshot import read_snapshot, write_snapshot
    from moderation.banks.snapshot_payload import Payload
    from moderation.crypto.keys import KeyRing

    ring = KeyRing({"bench": secrets.token_bytes(32)}, "bench")
    payload = Payload.empty("bench", 1280)
    payload.entry_ids = np.arange(n, dtype=np.int64)
    payload.pdq = np.random.default_rng(0).integers(0, 256, (n, 32), dtype=np.uint8)
    payload.pdq_quality = np.full(n, 100, dtype=np.uint8)
    payload.active = np.ones(n, dtype=np.bool_)
    payload.vectors_in_index = True  # every entry is active: no rows outside the index
    payload.cosine_index = serialized
    plain = payload.to_bytes()
    del payload
    written = write_snapshot(
        work, plain, snapshot_id="speed", version=1, encoder_id="bench", keyring=ring
    )
    del plain
    times = []
    for _ in range(3):
        start = time.perf_counter()
        data = read_snapshot(
            written.path,
            ring,
            expected_snapshot_id="speed",
            expected_version=1,
            expected_encoder_id="bench",
            expected_sha256=written.sha256,
        )
        loaded = Payload.from_bytes(data)
        assert loaded.cosine_index is not None
        index = load_index(loaded.cosine_index, authenticated=True)
        assert isinstance(index, CosineIndex) and len(index) == n
        times.append(time.perf_counter() - start)
        del data, loaded, index
    written.path.unlink()
    return float(statistics.median(times)), written.size_bytes


def _build(gen: Generator, n: int) -> CosineIndex:
    """The index ``CosineIndex.build`` chooses for ``n`` generated entries, built chunk by chunk."""
    from moderation.banks.index import CosineIndex
    from moderation.banks.index.cosine import PCA_MIN_ENTRIES
    from moderation.banks.index.cosine_projection import ivf_nlist

    # The projection is learned from the first chunks (PCA_TRAIN_ROWS rows are sampled);
    # the rest is added as it is generated, so full-width vectors are never all in memory.
    first = np.concatenate([block for _, block in itertools.islice(gen.chunks(n), 5)])
    if n >= PCA_MIN_ENTRIES:
        # The lists are sized for the whole bank, not for the first chunks built from.
        index = CosineIndex.build(
            np.arange(len(first)), first, algorithm="ivf_pca", nlist=ivf_nlist(n)
        )
    else:
        index = CosineIndex.build(np.arange(len(first)), first)
    del first
    for chunk_start, block in itertools.islice(gen.chunks(n), 5, None):
        index.add(np.arange(chunk_start, chunk_start + len(block)), block)
    return index


def _timed_search(index: CosineIndex, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    """Per-query latency (ms) and top-10 ids of ``queries``, after an untimed warm-up."""
    for query in queries[:WARMUP_QUERIES]:  # a serving worker's index is warm
        index.search(query[None, :], 10, -1.0)
    latencies = []
    found = []
    for query in queries:
        t0 = time.perf_counter()
        (hits,) = index.search(query[None, :], 10, -1.0)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        found.append([h.id for h in hits])
    return latencies, found


def _echo_index_row(echo: Echo, row: dict[str, Any]) -> None:
    n = row["entries"]
    echo(
        f"  index {n:>9,}: p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms (exact "
        f"p50 {row['exact_p50_ms']:.1f} ms, ratio {row['speedup_p50']}), recall@10 "
        f"{row['recall_at_10']:.4f} (tolerant {row['recall_at_10_tolerant']:.4f}), "
        f"{row['bytes_per_entry']:.0f} B/entry (exact {row['exact_bytes_per_entry']}), "
        f"snapshot load {row['snapshot_load_s']:.2f} s vs build at load "
        f"{row['build_at_load_s']:.0f} s, index RSS {row['index_rss_mb']:.0f} MB, process "
        f"peak RSS {row['peak_rss_mb']:.0f} MB, build {row['build_s']:.0f} s"
    )


def _bench_size(gen: Generator, n: int, work: Path) -> dict[str, Any]:
    """The index section's row for a bank of ``n`` generated entries."""
    import faiss

    start = time.perf_counter()
    rss_before = _rss_mb()
    index = _build(gen, n)
    build_s = time.perf_counter() - start
    queries = _queries(gen, n)
    true_scores, true_ids = _exact(gen, n, queries, 10)
    faiss.omp_set_num_threads(1)  # as workers search: one query, one thread
    latencies, found = _timed_search(index, queries)
    exact_ms = _exact_latency(gen, n, queries)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    strict = float(
        np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, true_ids.tolist(), strict=True)])
    )
    tolerant = _tolerant_recall(gen, n, queries, found, true_scores)
    params = index.params
    index_rss = _rss_mb() - rss_before
    serialized = index.serialize()
    per_entry = len(serialized) / n
    del index
    load_s, size_bytes = _snapshot_load(serialized, n, work)
    del serialized
    return {
        "entries": n,
        "algorithm_params": params,
        "build_s": round(build_s, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 2),
        "exact_p99_ms": round(float(np.percentile(exact_ms, 99)), 2),
        "exact_timing": "measured" if n <= EXACT_TIMING_MAX else "chunk x chunks",
        "speedup_p50": round(float(np.percentile(exact_ms, 50) / np.percentile(latencies, 50)), 1),
        "recall_at_10": round(strict, 4),
        "recall_at_10_tolerant": round(tolerant, 4),
        "bytes_per_entry": round(per_entry, 1),
        "exact_bytes_per_entry": gen.dim * 4 + 8,
        "snapshot_bytes": size_bytes,
        "snapshot_load_s": round(load_s, 2),
        "build_at_load_s": round(build_s, 1),
        "index_rss_mb": round(index_rss, 0),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def bench_index(real: np.ndarray, sizes: Sequence[int], echo: Echo) -> list[dict[str, Any]]:
    """The index section at each bank size (see the module docstring)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    gen = Generator(real)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="moderation-speed-snap-"))
    for n in sizes:
        echo(f"  index: generating and building {n:,} entries ...")
        row = _bench_size(gen, n, work)
        rows.append(row)
        _echo_index_row(echo, row)
    return rows


def _rss_mb() -> float:
    """This process's resident memory now, MB (``/proc/self/statm``; 0 where absent)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _tolerant_recall(
    gen: Generator,
    n: int,
    queries: np.ndarray,
    found: list[list[int]],
    true_scores: np.ndarray,
) -> float:
    """ann-benchmarks' k-NN recall: returned entries whose true cosine is at least the true
    10th best minus 1e-3 count as correct."""
    wanted = sorted({i for row in found for i in row})
    vectors: dict[int, np.ndarray] = {}
    position = 0
    for start, block in gen.chunks(n):
        while position < len(wanted) and wanted[position] < start + len(block):
            vectors[wanted[position]] = block[wanted[position] - start]
            position += 1
    scores: list[float] = []
    for query, row, truth in zip(queries, found, true_scores, strict=True):
        floor = float(truth[-1]) - 1e-3
        good = sum(float(query @ vectors[i]) >= floor for i in row)
        scores.append(good / len(row) if row else 0.0)
    return float(np.mean(scores))


def extrapolate(rows: Sequence[dict[str, Any]], target: int = 10_000_000) -> dict[str, Any] | None:
    """10M figures from the two largest measured sizes (method in the module docstring)."""
    if len(rows) < 2:
        return None
    small, large = rows[-2], rows[-1]
    factor = target / large["entries"]
    if large["algorithm_params"].get("algorithm") == "ivf_pca":
        # nlist ~ sqrt(n): the centroids compared and the entries in nprobe lists both grow
        # with sqrt(n), so does the search time.
        growth = factor**0.5
        p50, p99 = large["p50_ms"] * growth, large["p99_ms"] * growth
        how = f"p50/p99 x sqrt({factor:g}) (ivf_pca scans ~ sqrt n)"
    else:
        p50 = 2 * large["p50_ms"] - small["p50_ms"]
        p99 = 2 * large["p99_ms"] - small["p99_ms"]
        how = (
            f"p50/p99 plus the {small['entries']:,} -> {large['entries']:,} increase once more "
            "(HNSW ~ log n)"
        )
    return {
        "entries": target,
        "method": f"bytes and load time linear in n from the largest size; {how}",
        "bytes_per_entry": large["bytes_per_entry"],
        "memory_gb": round(large["bytes_per_entry"] * target / 1e9, 1),
        "snapshot_load_s": round(large["snapshot_load_s"] * factor, 1),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "exact_p50_ms": round(large["exact_p50_ms"] * factor, 1),
    }
