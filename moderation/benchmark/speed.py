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
``process``   ``moderation screen`` as a whole command: start-up (one photo) wall time and
              peak RSS, 240 photos' wall time, images/s and marginal images/s, ``--help``,
              and the CPU model (:mod:`moderation.benchmark.speed_process`).
``index``     at each bank size (default 100k and 1M), the index ``CosineIndex.build``
              chooses against exact search, with generated bank vectors and a 10M
              extrapolation: :mod:`moderation.benchmark.speed_index`, whose docstring has the
              method.
"""

from __future__ import annotations

import inspect
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.benchmark.speed_index import Echo, bench_index, extrapolate, real_embeddings
from moderation.benchmark.speed_process import bench_process, cpu_model
from moderation.benchmark.speed_process import describe as describe_process
from moderation.config import Settings

if TYPE_CHECKING:
    from moderation.media.decode import DecodeLimits

IMAGE_SUFFIXES: Final = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SHARED_PHOTOS: Final = Path(__file__).resolve().parents[2].parent / "shared/data/photos-dev"
LARGE_SIDE: Final = 2048


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


def _pillow_decoder(datas: Sequence[bytes]) -> Callable[[], int]:
    """The baseline decode: Pillow's full decode and ``convert("RGB")`` of each of ``datas``."""

    def pillow() -> int:
        for data in datas:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
        return len(datas)

    return pillow


def _fast_decoder(
    datas: Sequence[bytes], limits: DecodeLimits, draft: tuple[int, int] | None
) -> Callable[[], int]:
    """The screener's decode of each of ``datas``: :func:`decode_image` with its draft size."""
    from moderation.media.decode import decode_image

    def fast() -> int:
        for data in datas:
            decode_image(data, limits, draft_size=draft, draft_by_orientation=True)
        return len(datas)

    return fast


def _upscaled_jpegs(frames: Sequence[Image.Image]) -> list[bytes]:
    """The first 16 ``frames`` upscaled to :data:`LARGE_SIDE` px on the long side, as JPEG."""
    large = []
    for frame in frames[:16]:
        scale = LARGE_SIDE / max(frame.size)
        size = (round(frame.width * scale), round(frame.height * scale))
        buffer = io.BytesIO()
        frame.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        large.append(buffer.getvalue())
    return large


def bench_decode(datas: Sequence[bytes], settings: Settings, repeats: int) -> list[dict[str, Any]]:
    """Decode and PDQ rates (images/s), baseline vs fast."""
    from moderation.matching.screening import Screener
    from moderation.media.decode import DecodeLimits, decode_image
    from moderation.signals.pdq import pdq_hash_dihedral

    limits = DecodeLimits.from_settings(settings)
    draft: tuple[int, int] | None = inspect.signature(Screener).parameters["draft_size"].default
    frames = [
        decode_image(d, limits, draft_size=draft, draft_by_orientation=True).frames[0]
        for d in datas
    ]
    # Uploads are often far larger than these photos; JPEG draft mode only helps when a frame
    # is at least twice the draft size, so the same photos are also timed upscaled to 2048 px.
    large = _upscaled_jpegs(frames)

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
            _median_rate(_pillow_decoder(datas), repeats),
            _median_rate(_fast_decoder(datas, limits, draft), repeats),
            draft_size=list(draft) if draft else None,
        ),
        _pair(
            f"decode, JPEG upscaled to {LARGE_SIDE} px",
            "images/s",
            _median_rate(_pillow_decoder(large), repeats),
            _median_rate(_fast_decoder(large, limits, draft), repeats),
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
    eager = EfficientNetLite0Encoder(device=torch.device(str(fast.device)), runtime="eager")
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
    from moderation.benchmark.speed_process import bench_runtime

    bank = list(paths[:bank_size])
    runtime = bench_runtime(paths, settings, bank_size)
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


# --- entry point ------------------------------------------------------------------------------


def _process_section(
    paths: Sequence[Path], settings: Settings, bank_size: int, repeats: int, echo: Echo
) -> dict[str, Any]:
    """:func:`bench_process` over up to 240 photos, echoed."""
    row = bench_process(
        paths, settings, bank_size=bank_size, screen_count=min(240, len(paths)), repeats=repeats
    )
    for line in describe_process(row):
        echo(line)
    return row


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
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2),
        },
        "images": len(paths),
        "images_dir": str(paths[0].parent),
    }
    echo(
        f"speed benchmark: {len(paths)} images from {paths[0].parent}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, load {report['machine']['load_1min']}"
    )
    if stages:
        report["process"] = _process_section(paths, settings, bank_size, repeats, echo)
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
