"""Prototype measurement for issue 16 item 1 (a 10M-entry bank in <= 6 GB of worker RSS):
candidates from an in-RAM FAISS index over PCA-256 projections, re-ranked exactly from
full-width float16 rows kept OUT of RAM in a file (only the candidates' rows are read, with
``os.pread``, k x k_factor per query).

Usage (from the repository root, vectors as ``moderation benchmark speed`` generates them)::

    PYTHONPATH=$PWD python scripts/bench_index_memory.py N {sq8|pq128|pq32} [WORKDIR]

The photos: ``MODERATION_BENCH_PHOTOS=DIR`` (``../shared/data/photos-dev``'s 458 photos for
the figures in README; the 7 scikit-image photos give far denser clusters).
``BENCH_COLD=1`` drops the row file from the page cache before the queries (cold reads).
A second run with the same N and kind reuses the built files (build time then nan).

Prints build time, in-RAM bytes per entry, and for each (nprobe, k_factor) recall@10 against
exact search (strict and ann-benchmarks' tolerant form, 1e-3), p50/p99 ms per single query, and
the VmHWM/VmRSS of a fresh process that loads the serialized candidate index, reads the rows and
runs the queries (the worker's view). Not a pytest: a measurement tool, run by hand.
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

import faiss
import numpy as np

from moderation.banks.index.cosine_projection import ivf_nlist, learn_projection
from moderation.benchmark import speed_index as si

SETTINGS = ((32, 16), (32, 32))


def candidate_index(kind: str, nlist: int, first: np.ndarray) -> faiss.IndexPreTransform:
    """``PCA256,IVF<nlist>,<SQ8|PQ128|PQ32>`` with the projection learned from ``first``."""
    projection = faiss.LinearTransform(1280, 256, False)
    faiss.copy_array_to_vector(learn_projection(first, 256).ravel(), projection.A)
    projection.is_trained = True
    quantiser = faiss.IndexFlatIP(256)
    ivf: faiss.Index
    if kind == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(
            quantiser, 256, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        m = int(kind.removeprefix("pq"))
        ivf = faiss.IndexIVFPQ(quantiser, 256, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexPreTransform(projection, ivf)
    return index


def build(gen: si.Generator, n: int, kind: str, work: Path) -> tuple[Path, Path, float]:
    """Build the candidate index and the float16 row file chunk by chunk; their paths and
    the build time (s)."""
    started = time.perf_counter()
    nlist = ivf_nlist(n)
    need = max(si.CHUNK * 3, 64 * nlist)
    blocks = (block for _, block in gen.chunks(n))
    sample = np.concatenate(list(itertools.islice(blocks, -(-need // si.CHUNK))))
    index = candidate_index(kind, nlist, sample[:60_000])
    index.train(sample)
    del sample
    rows_path = work / f"rows_{n}.npy"
    rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.float16, shape=(n, 1280))
    for start, block in gen.chunks(n):
        index.add(block)
        rows[start : start + len(block)] = block
    rows.flush()
    del rows
    index_path = work / f"candidates_{kind}_{n}.faiss"
    faiss.write_index(index, str(index_path))
    return index_path, rows_path, time.perf_counter() - started


class RowFile:
    """Float16 (n, 1280) rows of a ``.npy`` file read with ``os.pread`` (no mapping: the
    page cache holds what was read, the process's RSS does not)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, _ = np.lib.format.read_array_header_1_0(handle)
            self.offset = handle.tell()
        self.width = shape[1] * 2
        self.fd = os.open(path, os.O_RDONLY)
        if os.environ.get("BENCH_COLD") == "1":
            # Drop this file's pages from the page cache: every row is read from the disk.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (ascending), float32 (len(ids), 1280)."""
        data = b"".join(
            os.pread(self.fd, self.width, self.offset + int(i) * self.width) for i in ids
        )
        return np.frombuffer(data, dtype=np.float16).reshape(len(ids), -1).astype(np.float32)


def serve(index_path: str, rows_path: str, queries_path: str) -> None:
    """The worker's view (run in a fresh process): load, map, search; print JSON."""
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = faiss.read_index(index_path)
    rows = RowFile(rows_path)
    load_s = time.perf_counter() - started
    queries = np.load(queries_path)
    ivf = faiss.extract_index_ivf(index)
    out: dict[str, object] = {"load_s": round(load_s, 2)}
    for nprobe, k_factor in SETTINGS:
        ivf.nprobe = nprobe
        found, scores, times = [], [], []
        for query in queries:
            t0 = time.perf_counter()
            _, cand = index.search(query[None], 10 * k_factor)
            ids = np.sort(cand[0][cand[0] >= 0])
            exact = rows.read(ids) @ query
            top = np.argsort(-exact)[:10]
            times.append((time.perf_counter() - t0) * 1000)
            found.append(ids[top].tolist())
            scores.append(exact[top].tolist())
        out[f"nprobe{nprobe}_kf{k_factor}"] = {"found": found, "scores": scores, "ms": times}
    status = Path("/proc/self/status").read_text().splitlines()
    out["mem"] = [
        line for line in status if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))
    ]
    print(json.dumps(out))


def real_embeddings(work: Path) -> np.ndarray:
    """The generator's real embeddings (``WORKDIR/real.npy``, else computed as ``moderation
    benchmark speed`` does from ``MODERATION_BENCH_PHOTOS`` or its default photos, and saved)."""
    cached = work / "real.npy"
    if cached.exists():
        return np.load(cached)
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


def report(n: int, kind: str, work: Path) -> None:
    """Build, then measure in a fresh process, and print one line per search setting."""
    gen = si.Generator(real_embeddings(work))
    queries = si._queries(gen, n)
    true_scores, true_ids = si._exact(gen, n, queries, 10)
    np.save(work / "queries.npy", queries)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index_path = work / f"candidates_{kind}_{n}.faiss"
    rows_path = work / f"rows_{n}.npy"
    build_s = float("nan")  # reused from an earlier run of the same n and kind
    if not (index_path.exists() and rows_path.exists()):
        index_path, rows_path, build_s = build(gen, n, kind, work)
    per_entry = index_path.stat().st_size / n
    print(f"n {n:,} {kind}: build {build_s:.0f} s, in-RAM index {per_entry:.0f} B/entry")
    argv = [sys.executable, __file__, "serve", str(index_path), str(rows_path)]
    # Our own interpreter and script, paths we just wrote: no untrusted input.
    done = subprocess.run(  # noqa: S603
        [*argv, str(work / "queries.npy")], capture_output=True, check=True
    )
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    print(f"  fresh process: load {out['load_s']} s, {'; '.join(out['mem'])}")
    for nprobe, k_factor in SETTINGS:
        res = out[f"nprobe{nprobe}_kf{k_factor}"]
        strict = np.mean(
            [
                len(set(f) & set(t)) / 10
                for f, t in zip(res["found"], true_ids.tolist(), strict=True)
            ]
        )
        tolerant = np.mean(np.asarray(res["scores"]) >= true_scores[:, -1:] - 1e-3)
        print(
            f"  nprobe {nprobe} k_factor {k_factor}: recall@10 {strict:.4f} (tolerant "
            f"{tolerant:.4f}), p50 {np.percentile(res['ms'], 50):.2f} ms, p99 "
            f"{np.percentile(res['ms'], 99):.2f} ms, load avg {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:5])
    else:
        work = Path(
            sys.argv[3]
            if len(sys.argv) > 3
            else Path(tempfile.gettempdir(), "moderation-index-memory")
        )
        work.mkdir(parents=True, exist_ok=True)
        report(int(sys.argv[1]), sys.argv[2], work)
