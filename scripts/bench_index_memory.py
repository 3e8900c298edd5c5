"""Measure the ``ivf_disk`` cosine index (issue 16 item 1: a 10M-entry bank in <= 6 GB of
worker RSS) through the product's code: ``CosineIndex`` built chunk by chunk (bounded RAM),
its serialized bytes written as an encrypted snapshot (:func:`write_snapshot`), and a fresh
process that decrypts the snapshot, loads the index zero-copy with its encrypted row file
(``load_index(..., row_dir=...)``) and serves single queries: the worker's view.

Usage (from the repository root, vectors as ``moderation benchmark speed`` generates them)::

    MODERATION_BENCH_PHOTOS=../shared/data/photos-dev PYTHONPATH=$PWD \\
        python scripts/bench_index_memory.py N [WORKDIR]

Prints build time, the candidate index's bytes per entry, the row file's size, snapshot load
time, VmHWM/VmRSS of the serving process, and recall@10 against exact search (strict and
ann-benchmarks' tolerant form, 1e-3) with p50/p99 ms per single query and the load average.
The exact top-10 of the 200 queries is computed by streaming over the generated vectors while
the index is built (no second pass). ``BENCH_COLD=1`` drops the row file from the page cache
before the queries; ``BENCH_CACHE=cold,warm`` measures both in one process, and
``BENCH_RERANK=32:0,8:0.75`` (``rerank_factor:residual_weight`` per pass, see
:mod:`moderation.banks.index.disk`) compares re-ranking depths; each pass also prints its CPU
ms per query. Not a pytest: a measurement tool, run by hand.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moderation.banks.index import CosineIndex, load_index
from moderation.banks.index.cosine_projection import ivf_nlist
from moderation.banks.index.disk import RERANK_FACTOR, RESIDUAL_WEIGHT
from moderation.banks.snapshot import read_snapshot, write_snapshot
from moderation.benchmark import speed_index as si
from moderation.crypto.keys import KeyRing

K = 10
ENCODER = "bench"


def queries_for(gen: si.Generator, n: int) -> np.ndarray:
    """``speed_index._queries`` without generating the chunks that hold no query source."""
    rng = np.random.default_rng((si.SEED, n, 1))
    sources = np.sort(rng.choice(n, si.QUERIES, replace=False))
    picked = []
    for start in range(0, n, si.CHUNK):
        inside = sources[(sources >= start) & (sources < start + si.CHUNK)]
        if inside.size:
            picked.append(gen.chunk(start, min(si.CHUNK, n - start))[inside - start])
    queries = np.concatenate(picked)
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * (
        si.QUERY_NOISE / np.sqrt(gen.dim)
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32)


class Exact:
    """Running exact top-``K`` (cosines, ids) of the queries over the chunks seen so far."""

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = queries
        self.scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), K), dtype=np.int64)

    def update(self, start: int, block: np.ndarray) -> None:
        scores = self.queries @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        merged = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-merged, axis=1)[:, :K]
        self.scores = np.take_along_axis(merged, order, axis=1)
        self.ids = np.take_along_axis(merged_ids, order, axis=1)


def build(gen: si.Generator, n: int, work: Path, exact: Exact) -> tuple[bytes, float]:
    """Build ``ivf_disk`` over ``n`` generated entries chunk by chunk; its serialized bytes
    and the build time (s)."""
    started = time.perf_counter()
    nlist = ivf_nlist(n)
    index = CosineIndex(1280, algorithm="ivf_disk", nlist=nlist, row_dir=work, row_name="rows")
    chunks = gen.chunks(n)
    first = list(itertools.islice(chunks, -(-max(si.CHUNK * 3, 32 * nlist) // si.CHUNK)))
    matrix = np.concatenate([block for _, block in first])
    index.add(np.arange(len(matrix)), matrix)
    for start, block in first:
        exact.update(start, block)
    del matrix, first
    for start, block in chunks:
        index.add(np.arange(start, start + len(block)), block)
        exact.update(start, block)
        if start % 1_000_000 == 0:
            print(f"  {start:,} rows, {time.perf_counter() - started:.0f} s", flush=True)
    return index.serialize(), time.perf_counter() - started


def passes() -> list[tuple[str, int, float]]:
    """The (page cache, rerank_factor, residual_weight) of each pass over the queries:
    ``BENCH_RERANK`` (comma-separated ``factor:weight``, default the index's own settings)
    times ``BENCH_CACHE`` (``cold``, ``warm`` or ``cold,warm``; default ``cold`` when
    ``BENCH_COLD=1`` else ``warm``). A ``cold`` pass drops the row file from the page cache
    first; a ``warm`` pass follows a pass over the same queries."""
    default = "cold" if os.environ.get("BENCH_COLD") == "1" else "warm"
    caches = os.environ.get("BENCH_CACHE", default).split(",")
    settings = [
        (int(factor), float(weight))
        for factor, weight in (
            item.split(":") for item in os.environ.get("BENCH_RERANK", "").split(",") if item
        )
    ] or [(RERANK_FACTOR, RESIDUAL_WEIGHT)]
    return [(cache, f, w) for f, w in settings for cache in caches]


def timed_pass(index: CosineIndex, queries: np.ndarray) -> dict[str, list[Any]]:
    """One pass of single queries: ids, scores, ms per query and the pass's CPU ms (user +
    sys) per query (the rest of a query's time is waiting: for rows, or for a core)."""
    found, scores, times = [], [], []
    cpu = time.process_time()
    for query in queries:
        t0 = time.perf_counter()
        hits = index.search(query[None], K, -1.0)[0]
        times.append((time.perf_counter() - t0) * 1000)
        found.append([h.id for h in hits])
        scores.append([h.score for h in hits])
    cpu_ms = (time.process_time() - cpu) * 1000 / len(queries)
    return {"found": found, "scores": scores, "ms": times, "cpu_ms": cpu_ms}


def serve(work: str) -> None:
    """The worker's view (a fresh process): decrypt the snapshot, load, search; print JSON."""
    import faiss

    faiss.omp_set_num_threads(1)
    meta = json.loads(Path(work, "meta.json").read_text())
    keyring = KeyRing.load_file(Path(work, "keyring"))
    started = time.perf_counter()
    plaintext = read_snapshot(
        Path(meta["snapshot"]),
        keyring,
        expected_snapshot_id="bench",
        expected_version=meta["n"],
        expected_encoder_id=ENCODER,
    )
    index = load_index(plaintext, authenticated=True, row_dir=Path(work))
    load_s = time.perf_counter() - started
    assert isinstance(index, CosineIndex) and index.disk is not None and index.row_path
    queries = np.load(Path(work, "queries.npy"))
    runs = []
    for cache, factor, weight in passes():
        index.disk.rerank_factor, index.disk.residual_weight = factor, weight
        if cache == "cold":
            fd = os.open(str(index.row_path), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        else:
            timed_pass(index, queries)  # the rows these queries read, into the page cache
        run = timed_pass(index, queries)
        runs.append({**run, "cache": cache, "factor": factor, "weight": weight})
        runs[-1]["loadavg"] = os.getloadavg()[0]
    status = Path("/proc/self/status").read_text().splitlines()
    mem = [line for line in status if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))]
    print(json.dumps({"load_s": load_s, "runs": runs, "mem": mem}))


def real_embeddings(work: Path) -> np.ndarray:
    """The generator's real embeddings (``WORKDIR/real.npy``, else computed as ``moderation
    benchmark speed`` does from ``MODERATION_BENCH_PHOTOS`` or its default photos, and saved)."""
    cached = work / "real.npy"
    if cached.exists():
        loaded: np.ndarray = np.load(cached)
        return loaded
    from PIL import Image

    from moderation.benchmark.speed import find_images
    from moderation.config import load_settings
    from moderation.signals.encoders import create_encoder

    photos = os.environ.get("MODERATION_BENCH_PHOTOS")
    paths = find_images(Path(photos) if photos else None)
    settings = load_settings()
    encoder = create_encoder(settings.encoder, device=settings.device)
    real = si.real_embeddings([Image.open(p).convert("RGB") for p in paths], encoder.encode)
    np.save(cached, real)
    return real


def report(n: int, work: Path) -> None:
    """Build (unless WORKDIR holds this N's build), then measure in a fresh process."""
    import faiss

    gen = si.Generator(real_embeddings(work))
    meta_path = work / "meta.json"
    if not meta_path.exists() or json.loads(meta_path.read_text())["n"] != n:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        queries = queries_for(gen, n)
        exact = Exact(queries)
        (work / "rows").unlink(missing_ok=True)
        serialized, build_s = build(gen, n, work, exact)
        keyring = KeyRing.generate()
        keyring.save_file(work / "keyring")
        written = write_snapshot(
            work, serialized, snapshot_id="bench", version=n, encoder_id=ENCODER, keyring=keyring
        )
        np.save(work / "queries.npy", queries)
        np.save(work / "exact_ids.npy", exact.ids)
        np.save(work / "exact_scores.npy", exact.scores)
        meta = {"n": n, "build_s": build_s, "index_bytes": len(serialized)}
        meta_path.write_text(json.dumps({**meta, "snapshot": str(written.path)}))
    meta = json.loads(meta_path.read_text())
    print(
        f"n {n:,} ivf_disk: build {meta['build_s']:.0f} s, candidate index "
        f"{meta['index_bytes'] / n:.0f} B/entry, row file "
        f"{(work / 'rows').stat().st_size / 1e9:.1f} GB (encrypted)"
    )
    argv = [sys.executable, __file__, "serve", str(work)]
    # Our own interpreter and script, paths we just wrote: no untrusted input.
    done = subprocess.run(argv, capture_output=True, check=True)  # noqa: S603
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    print(f"  fresh process: snapshot load {out['load_s']:.2f} s, {'; '.join(out['mem'])}")
    true_ids, true_scores = np.load(work / "exact_ids.npy"), np.load(work / "exact_scores.npy")
    for run in out["runs"]:
        strict = np.mean(
            [len(set(f) & set(t)) / K for f, t in zip(run["found"], true_ids.tolist(), strict=True)]
        )
        tolerant = np.mean(np.asarray(run["scores"]) >= true_scores[:, -1:] - 1e-3)
        print(
            f"  {run['cache']:4} rows {K * run['factor']} (weight {run['weight']}): recall@10 "
            f"{strict:.4f} (tolerant {tolerant:.4f}), p50 {np.percentile(run['ms'], 50):.2f} ms, "
            f"p99 {np.percentile(run['ms'], 99):.2f} ms, CPU {run['cpu_ms']:.2f} ms/query "
            f"(1 thread), load average {run['loadavg']:.1f}"
        )


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        default = Path(tempfile.gettempdir(), "moderation-index-memory")
        work = Path(sys.argv[2]) if len(sys.argv) > 2 else default
        work.mkdir(parents=True, exist_ok=True)
        report(int(sys.argv[1]), work)
