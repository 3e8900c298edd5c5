"""``moderation benchmark speed``: every fast path beside its baseline, measured in one run.

BENCHMARKS.md "Speed and scale": the machine is shared and noisy, so each figure is a median
over repeats and is printed with its baseline from the same run and the ratio. Sections:

``decode``    Pillow full decode + ``convert("RGB")`` (baseline) vs :func:`decode_image` with
              the screener's JPEG draft size (one decode shared by encoder and PDQ).
``pdq``       PDQ with its 8 dihedral variants on full-size frames (baseline) vs on frames
              downsampled to 512 px first (:data:`moderation.signals.pdq.PDQ_DOWNSAMPLE_MAX_SIDE`).
``encoder``   eager PyTorch with torchvision preprocessing (the encoder before issue 7) vs the
              configured runtime (default ONNX Runtime with numpy preprocessing), batch 1 and
              32, images/s, and the least per-image cosine between the two.
``pipeline``  per image, decode + PDQ + embed + search + decide through :class:`Screener`
              against a bank of the first images (batch 32) vs the naive pipeline of
              ``scripts/naive_screen.py`` (Pillow decode, eager encoder at batch 32, exact
              numpy cosine search), in-process.
``index``     at each bank size (default 100k and 1M): single-query latency p50/p99 of the
              index ``CosineIndex.build`` chooses (``ivf_pca``) against exact search (FAISS
              ``IndexFlatIP`` over the full 1280-d vectors), recall@10 against exact search
              (strict, and ann-benchmarks' tolerant form: a hit counts when its true cosine is
              within 1e-3 of the true 10th), build time, bytes per entry, and the encrypted
              bank snapshot's load time (read, SHA-256, decrypt, parse, zero-copy index load;
              the payload :func:`~moderation.banks.versions.commit_signals` writes, without
              the classifier stage's region vectors) against building the index at load (what
              a worker did before snapshots carried the index).

Bank vectors for the index section are generated from real embeddings, because no real
million-image bank exists here: the benchmark photos and three edits of each (mirror, centre
crop 75%, greyscale) are embedded; each generated entry is a Dirichlet(0.5) mixture of 4 random
real embeddings plus isotropic Gaussian noise of norm 0.1, normalised. Queries are 200
generated entries perturbed by noise of norm 0.3 (edited copies); the first 20 are searched once
untimed first (a serving worker's index is warm), then all 200 are timed. The vectors are
generated in seeded chunks and never held all at once at full width (1M x 1280 float32 would be
5 GB):
ground truth is an exact chunked scan, and the exact single-query baseline at sizes above
:data:`EXACT_TIMING_MAX` is the measured time over one chunk times the number of chunks.
10M is extrapolated from the 100k and 1M figures: bytes and load time linearly in n; ``ivf_pca``
latency times sqrt(10) (its lists number about sqrt(n), so the centroids compared and the
entries scanned per query both grow with sqrt(n)), HNSW latency by adding the 100k -> 1M
increase once more (HNSW search grows about with log n).
"""

from __future__ import annotations

import inspect
import io
import itertools
import os
import resource
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from moderation.config import Settings

IMAGE_SUFFIXES: Final = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SHARED_PHOTOS: Final = Path(__file__).resolve().parents[2].parent / "shared/data/photos-dev"
CHUNK: Final = 20_000
EXACT_TIMING_MAX: Final = 200_000
QUERIES: Final = 200
WARMUP_QUERIES: Final = 20
MIX: Final = 4
ENTRY_NOISE: Final = 0.1
QUERY_NOISE: Final = 0.3
SEED: Final = 20240607
LARGE_SIDE: Final = 2048

Echo = Callable[[str], None]


def find_images(images_dir: Path | None) -> list[Path]:
    """Benchmark photos: ``images_dir``, else ``../shared/data/photos-dev`` when present, else
    the scikit-image sample photos (written to a temporary folder)."""
    for folder in (images_dir, SHARED_PHOTOS if images_dir is None else None):
        if folder is not None and folder.is_dir():
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if found:
                return found
    from skimage import data

    out = Path(tempfile.mkdtemp(prefix="moderation-speed-photos-"))
    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry")
    paths = []
    for name in names:
        array = getattr(data, name)()
        image = Image.fromarray(array).convert("RGB")
        path = out / f"{name}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def _median_rate(fn: Callable[[], int], repeats: int) -> float:
    """Items per second of ``fn`` (which returns how many items it did): median of repeats."""
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - start))
    return float(statistics.median(rates))


def _pair(name: str, unit: str, baseline: float, fast: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "baseline": round(baseline, 3),
        "fast": round(fast, 3),
        "ratio": round(fast / baseline, 2) if baseline else None,
        **extra,
    }


def _echo_pair(echo: Echo, row: dict[str, Any], baseline: str, fast: str) -> None:
    extra = {k: v for k, v in row.items() if k not in {"name", "unit", "baseline", "fast", "ratio"}}
    tail = ("  " + ", ".join(f"{k} {v}" for k, v in extra.items())) if extra else ""
    echo(
        f"  {row['name']:<34} {baseline}: {row['baseline']:>9.2f}  {fast}: {row['fast']:>9.2f}"
        f"  {row['unit']:<10} ratio {row['ratio']}{tail}"
    )


# --- decode, PDQ, encoder ---------------------------------------------------------------------


def bench_decode(datas: Sequence[bytes], settings: Settings, repeats: int) -> list[dict[str, Any]]:
    """Decode and PDQ rates (images/s), baseline vs fast."""
    from moderation.matching.screening import Screener
    from moderation.media.decode import DecodeLimits, decode_image
    from moderation.signals.pdq import pdq_hash_dihedral

    limits = DecodeLimits.from_settings(settings)
    draft: tuple[int, int] | None = inspect.signature(Screener).parameters["draft_size"].default

    def pillow() -> int:
        for data in datas:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
        return len(datas)

    def fast() -> int:
        for data in datas:
            decode_image(data, limits, draft_size=draft, draft_by_orientation=True)
        return len(datas)

    frames = [
        decode_image(d, limits, draft_size=draft, draft_by_orientation=True).frames[0]
        for d in datas
    ]
    # Uploads are often far larger than these photos; JPEG draft mode only helps when a frame
    # is at least twice the draft size, so the same photos are also timed upscaled to 2048 px.
    large = []
    for frame in frames[:16]:
        scale = LARGE_SIDE / max(frame.size)
        size = (round(frame.width * scale), round(frame.height * scale))
        buffer = io.BytesIO()
        frame.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        large.append(buffer.getvalue())

    def pillow_large() -> int:
        for data in large:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
        return len(large)

    def fast_large() -> int:
        for data in large:
            decode_image(data, limits, draft_size=draft, draft_by_orientation=True)
        return len(large)

    def pdq_full() -> int:
        for frame in frames:
            pdq_hash_dihedral(frame, max_side=None)
        return len(frames)

    def pdq_fast() -> int:
        for frame in frames:
            pdq_hash_dihedral(frame)
        return len(frames)

    return [
        _pair(
            "decode",
            "images/s",
            _median_rate(pillow, repeats),
            _median_rate(fast, repeats),
            draft_size=list(draft) if draft else None,
        ),
        _pair(
            f"decode, JPEG upscaled to {LARGE_SIDE} px",
            "images/s",
            _median_rate(pillow_large, repeats),
            _median_rate(fast_large, repeats),
        ),
        _pair(
            "pdq (8 dihedral variants)",
            "images/s",
            _median_rate(pdq_full, repeats),
            _median_rate(pdq_fast, repeats),
        ),
    ]


def bench_encoder(
    images: Sequence[Image.Image], settings: Settings, repeats: int
) -> list[dict[str, Any]]:
    """Encoder images/s at batch 1 and 32: eager (torchvision preprocessing, NCHW model) vs the
    configured runtime, and the least per-image cosine between their embeddings."""
    import torch

    from moderation.signals.encoders import create_encoder
    from moderation.signals.encoders.base import l2_normalise
    from moderation.signals.encoders.timm_backend import EfficientNetLite0Encoder

    fast = create_encoder(
        settings.encoder,
        device=settings.device,
        runtime=settings.encoder_runtime,
        cache_dir=Path(tempfile.gettempdir()) / f"moderation-cache-{os.getuid()}",
    )
    eager = EfficientNetLite0Encoder(device=fast.device, runtime="eager")
    eager.load()
    fast.load()

    def eager_encode(batch: Sequence[Image.Image], size: int) -> npt.NDArray[np.float32]:
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), size):
                chunk = batch[start : start + size]
                tensor = torch.stack([eager._embed_transform(image) for image in chunk])
                outputs.append(eager._forward(tensor))
        return l2_normalise(torch.cat(outputs))

    sample = list(images[:32])
    rows = []
    for size, count in ((1, 16), (32, 32)):
        subset = sample[:count]

        def run_eager(subset: list[Image.Image] = subset, size: int = size) -> int:
            return len(eager_encode(subset, size))

        def run_fast(subset: list[Image.Image] = subset, size: int = size) -> int:
            return len(fast.encode(subset, batch_size=size))

        base = _median_rate(run_eager, repeats)
        quick = _median_rate(run_fast, repeats)
        cosine = float(np.min(np.sum(eager_encode(subset, size) * fast.encode(subset), axis=1)))
        rows.append(
            _pair(
                f"encoder batch {size}",
                "images/s",
                base,
                quick,
                runtime=getattr(fast, "runtime", "torch"),
                min_cosine=round(cosine, 6),
            )
        )
    return rows


# --- pipeline ---------------------------------------------------------------------------------

NAIVE_SCRIPT: Final = Path(__file__).resolve().parents[2] / "scripts" / "naive_screen.py"


def naive_screener_class() -> Any:
    """``NaiveScreener`` from ``scripts/naive_screen.py`` (the baseline lives in one place).

    Raises:
        FileNotFoundError: the script is not there (an installed package without the repo).
    """
    import importlib.util

    if not NAIVE_SCRIPT.is_file():
        raise FileNotFoundError(f"the naive baseline {NAIVE_SCRIPT} is not in this installation")
    spec = importlib.util.spec_from_file_location("naive_screen", NAIVE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NaiveScreener


def bench_pipeline(
    paths: Sequence[Path], settings: Settings, bank_size: int, repeats: int
) -> dict[str, Any]:
    """Per-image pipeline rate: :class:`Screener` vs the naive script's pipeline, in-process."""
    from moderation.banks.operations import import_bank
    from moderation.banks.records import create_bank
    from moderation.config import load_settings
    from moderation.crypto.keys import load_keyring
    from moderation.service.runtime import Runtime
    from moderation.storage.db import migrate, transaction

    work = Path(tempfile.mkdtemp(prefix="moderation-speed-"))
    values = {
        "data_dir": work / "var",
        "encoder": settings.encoder,
        "device": settings.device,
        "encoder_runtime": settings.encoder_runtime,
        "master_keys": None,
    }
    bench = load_settings(**values)
    bench.ensure_dirs()
    load_keyring(bench, create_dev=True)
    runtime = Runtime(bench)
    migrate(runtime.engine)
    with transaction(runtime.sessions) as session:
        create_bank(session, "bench")
    bank = list(paths[:bank_size])
    import_bank(runtime, "bench", bank, actor="benchmark")
    screener = runtime.screener()
    datas = [p.read_bytes() for p in paths]
    naive = naive_screener_class()(bank)

    def ours() -> int:
        for start in range(0, len(datas), 32):
            screener.screen_bytes(datas[start : start + 32])
        return len(datas)

    def theirs() -> int:
        return len(naive.screen(paths))

    row = _pair(
        "pipeline per image (screen)",
        "images/s",
        _median_rate(theirs, repeats),
        _median_rate(ours, repeats),
        images=len(datas),
        bank=len(bank),
    )
    runtime.engine.dispose()
    return row


# --- index ------------------------------------------------------------------------------------


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


def bench_index(real: np.ndarray, sizes: Sequence[int], echo: Echo) -> list[dict[str, Any]]:
    """The index section at each bank size (see the module docstring)."""
    import faiss

    from moderation.banks.index import CosineIndex
    from moderation.banks.index.cosine import PCA_MIN_ENTRIES
    from moderation.banks.index.cosine_projection import ivf_nlist

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    gen = Generator(real)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="moderation-speed-snap-"))
    for n in sizes:
        echo(f"  index: generating and building {n:,} entries ...")
        start = time.perf_counter()
        rss_before = _rss_mb()
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
        build_s = time.perf_counter() - start
        queries = _queries(gen, n)
        true_scores, true_ids = _exact(gen, n, queries, 10)
        faiss.omp_set_num_threads(1)  # as workers search: one query, one thread
        for query in queries[:WARMUP_QUERIES]:  # a serving worker's index is warm
            index.search(query[None, :], 10, -1.0)
        latencies = []
        found = []
        for query in queries:
            t0 = time.perf_counter()
            (hits,) = index.search(query[None, :], 10, -1.0)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            found.append([h.id for h in hits])
        exact_ms = _exact_latency(gen, n, queries)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        strict = float(
            np.mean(
                [len(set(f) & set(t)) / 10 for f, t in zip(found, true_ids.tolist(), strict=True)]
            )
        )
        tolerant = _tolerant_recall(gen, n, queries, found, true_scores)
        params = index.params
        index_rss = _rss_mb() - rss_before
        serialized = index.serialize()
        per_entry = len(serialized) / n
        del index
        load_s, size_bytes = _snapshot_load(serialized, n, work)
        del serialized
        row = {
            "entries": n,
            "algorithm_params": params,
            "build_s": round(build_s, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 2),
            "exact_p99_ms": round(float(np.percentile(exact_ms, 99)), 2),
            "exact_timing": "measured" if n <= EXACT_TIMING_MAX else "chunk x chunks",
            "speedup_p50": round(
                float(np.percentile(exact_ms, 50) / np.percentile(latencies, 50)), 1
            ),
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
        rows.append(row)
        echo(
            f"  index {n:>9,}: p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms (exact "
            f"p50 {row['exact_p50_ms']:.1f} ms, ratio {row['speedup_p50']}), recall@10 "
            f"{row['recall_at_10']:.4f} (tolerant {row['recall_at_10_tolerant']:.4f}), "
            f"{row['bytes_per_entry']:.0f} B/entry (exact {row['exact_bytes_per_entry']}), "
            f"snapshot load {row['snapshot_load_s']:.2f} s vs build at load "
            f"{row['build_at_load_s']:.0f} s, index RSS {row['index_rss_mb']:.0f} MB, process "
            f"peak RSS {row['peak_rss_mb']:.0f} MB, build {row['build_s']:.0f} s"
        )
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


# --- entry point ------------------------------------------------------------------------------


def run_speed_benchmark(
    settings: Settings,
    *,
    images_dir: Path | None,
    index_sizes: Sequence[int],
    bank_size: int,
    repeats: int,
    stages: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Run every section (``stages=False``: only the index section) and return (and echo) the
    report."""
    paths = find_images(images_dir)
    images = [Image.open(p).convert("RGB") for p in paths]
    datas = [p.read_bytes() for p in paths[:64]]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)},
        "images": len(paths),
        "images_dir": str(paths[0].parent),
    }
    echo(
        f"speed benchmark: {len(paths)} images from {paths[0].parent}, {os.cpu_count()} CPUs, "
        f"load {report['machine']['load_1min']}"
    )
    if stages:
        decode_rows = bench_decode(datas, settings, repeats)
        for row in decode_rows:
            _echo_pair(echo, row, "baseline", "fast")
        encoder_rows = bench_encoder(images, settings, repeats)
        for row in encoder_rows:
            _echo_pair(echo, row, "eager", "fast")
        pipeline = bench_pipeline(paths, settings, bank_size, repeats=max(1, repeats - 1))
        _echo_pair(echo, pipeline, "naive", "screen")
        report["stages"] = [*decode_rows, *encoder_rows, pipeline]
    if index_sizes:
        from moderation.signals.encoders import create_encoder

        encoder = create_encoder(settings.encoder, device=settings.device)
        real = real_embeddings(images, encoder.encode)
        report["index_real_embeddings"] = len(real)
        report["index"] = bench_index(real, index_sizes, echo)
        projected = extrapolate(report["index"])
        if projected is not None:
            report["index_extrapolated"] = projected
            echo(
                f"  index 10M (extrapolated): ~{projected['memory_gb']} GB, load "
                f"~{projected['snapshot_load_s']} s, p50 ~{projected['p50_ms']} ms, p99 "
                f"~{projected['p99_ms']} ms (exact p50 ~{projected['exact_p50_ms']} ms); "
                f"{projected['method']}"
            )
    report["load_1min_after"] = round(os.getloadavg()[0], 2)
    return report
