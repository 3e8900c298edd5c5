"""Faster forward passes for an encoder's image tower on the CPU: ONNX Runtime, channels_last.

Measured on the 2-core development machine (``moderation benchmark speed``; BENCHMARKS.md):
EfficientNet-Lite0 at batch 32 runs several times faster under ONNX Runtime's CPU execution
provider than in eager PyTorch, and ``channels_last`` alone gives about 1.6x (NHWC suits the
depthwise convolutions of MobileNet-style networks; PyTorch tutorial "Channels Last Memory
Format"). ``torch.compile`` was not kept: it needs a C++ toolchain at run time and compiles for
minutes on first use; dynamic int8 quantisation (``torch.ao.quantization.quantize_dynamic``)
only covers ``Linear``/LSTM layers, which this convolutional network's feature path has none of.

Runtimes (setting ``MODERATION_ENCODER_RUNTIME``):
    ``eager``: the model as built, NCHW float32 (float16 on CUDA); the reference.
    ``torch``: eager PyTorch with ``channels_last`` weights and inputs (CPU and CUDA).
    ``onnxruntime``: the image tower exported with ``torch.onnx.export`` at load time to a
    cache file, run by ``onnxruntime.InferenceSession`` (CPU only). Nothing is downloaded.
    ``auto``: ``onnxruntime`` on the CPU when the package is installed, else ``torch``.

Every ONNX session is checked against the eager model on a fixed probe batch when it is
created (:data:`PROBE_MIN_COSINE`); a cache file that disagrees (stale, truncated, tampered) is
exported again, and a second disagreement raises, so the fast path can never silently change
embeddings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
import torch

logger = logging.getLogger(__name__)

RuntimeName = Literal["auto", "onnxruntime", "torch", "eager"]
RUNTIMES: Final[tuple[str, ...]] = get_args(RuntimeName)

#: ONNX opset used for export: 17 is the newest the TorchScript exporter fully supports and
#: every onnxruntime >= 1.14 runs.
ONNX_OPSET: Final = 17

#: Least cosine similarity, per probe row, between the ONNX session's and the eager model's
#: raw features before a session is used. The same graph in float32 agrees to about 1e-6
#: (measured min 0.9999999); 0.999 leaves room for kernel-order rounding while any wrong weight
#: or truncated file fails by far.
PROBE_MIN_COSINE: Final = 0.999

#: Probe batch: rows of seeded uniform noise in the normalised input range [-1, 1].
PROBE_ROWS: Final = 2
PROBE_SEED: Final = 20240607


class FastPathError(RuntimeError):
    """The fast path could not be built or does not reproduce the eager model."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` is installed (found without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_runtime(requested: str, device: torch.device) -> str:
    """The concrete runtime (``onnxruntime``, ``torch`` or ``eager``) for ``requested``.

    Raises:
        ValueError: ``requested`` is not one of :data:`RUNTIMES`, or ``onnxruntime`` was asked
            for on a non-CPU device (its CUDA provider is not wired up) or is not installed.
    """
    if requested not in RUNTIMES:
        raise ValueError(f"unknown encoder runtime {requested!r}; expected one of {RUNTIMES}")
    if requested == "auto":
        if device.type == "cpu" and onnxruntime_available():
            return "onnxruntime"
        return "torch"
    if requested == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(
                f"encoder runtime 'onnxruntime' runs on the CPU only, device is {device}; "
                "use 'torch' (float16, channels_last) on CUDA"
            )
        if not onnxruntime_available():
            raise ValueError("encoder runtime 'onnxruntime' needs the onnxruntime package")
    return requested


def default_cache_dir() -> Path:
    """``<tmp>/moderation-cache-<uid>``, created with mode 0700 and checked to be ours.

    Raises:
        FastPathError: the directory exists but belongs to another user or is group/world
            writable (another user could plant a model file).
    """
    path = Path(tempfile.gettempdir()) / f"moderation-cache-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise FastPathError(f"cache directory {path} is not private to this user")
    return path


def onnx_cache_path(cache_dir: Path, stem: str, identity: str) -> Path:
    """The cache file for a model identified by ``identity`` (encoder id, torch version,
    opset): ``<cache_dir>/<stem>-<sha256(identity)[:24]>.onnx``."""
    key = f"{identity}|torch={torch.__version__}|opset={ONNX_OPSET}"
    return cache_dir / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``module`` (input ``x`` (n, 3, H, W) float32, output ``features`` (n, d)) with a
    dynamic batch axis to ``path``, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module,
                (example,),
                tmp_name,
                input_names=["x"],
                output_names=["features"],
                dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def probe_batch(size: int) -> torch.Tensor:
    """Deterministic probe input: float32 (:data:`PROBE_ROWS`, 3, size, size) in [-1, 1]."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.rand((PROBE_ROWS, 3, size, size), generator=generator) * 2.0 - 1.0


def min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine similarity between corresponding rows of two (n, d) tensors."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)
    return float(cos.min())


class OnnxForward:
    """Runs an exported image tower with ONNX Runtime's CPU provider.

    Call with a float32 CPU batch (n, 3, H, W); returns float32 features (n, d) as a tensor.
    ``threads`` sets ``intra_op_num_threads`` (the same count torch uses, so
    ``MODERATION_TORCH_THREADS`` governs both). Thread-safe: ``InferenceSession.run`` is.
    """

    def __init__(self, path: Path, *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self._session: Any = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        (features,) = self._session.run(["features"], {"x": array})
        return torch.from_numpy(np.asarray(features, dtype=np.float32))


def build_onnx_forward(
    module: torch.nn.Module, *, input_size: int, cache_path: Path, threads: int
) -> OnnxForward:
    """An :class:`OnnxForward` for ``module``, exported to ``cache_path`` unless a cached file
    reproduces ``module`` on the probe batch (:data:`PROBE_MIN_COSINE`).

    Raises:
        FastPathError: a freshly exported file still disagrees with ``module``.
    """
    probe = probe_batch(input_size)
    with torch.inference_mode():
        expected = module(probe)
    for attempt in ("cached", "exported"):
        if attempt == "exported" or not cache_path.is_file():
            logger.info("exporting the encoder to ONNX at %s", cache_path)
            export_onnx(module, probe, cache_path)
        try:
            forward = OnnxForward(cache_path, threads=threads)
            agreement = min_row_cosine(forward(probe), expected)
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            logger.warning("ONNX model %s unusable (%s)", cache_path, exc)
            agreement = -1.0
        if agreement >= PROBE_MIN_COSINE:
            return forward
        logger.warning(
            "ONNX model %s disagrees with the eager model (min cosine %.6f)",
            cache_path,
            agreement,
        )
    raise FastPathError(
        f"the ONNX export at {cache_path} does not reproduce the eager model "
        f"(min probe cosine {agreement:.6f} < {PROBE_MIN_COSINE})"
    )


def channels_last_forward(
    module: torch.nn.Module,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` converted in place to ``channels_last`` and a forward that feeds it NHWC."""
    module.to(memory_format=torch.channels_last)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = module(batch.contiguous(memory_format=torch.channels_last))
        return result

    return forward
