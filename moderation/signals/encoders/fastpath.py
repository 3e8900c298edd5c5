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
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
import torch

from moderation.signals.encoders.onnx_model import (
    ONNX_OPSET,
    PROBE_MIN_COSINE,
    FastPathError,
    default_cache_dir,
    onnxruntime_available,
    ort_session,
    probe_input,
)
from moderation.signals.encoders.onnx_model import min_row_cosine as lite0_min_row_cosine

__all__ = [
    "ONNX_OPSET",
    "PROBE_MIN_COSINE",
    "FastPathError",
    "build_onnx_forward",
    "channels_last_forward",
    "default_cache_dir",
    "export_onnx",
    "onnx_cache_path",
    "onnxruntime_available",
    "resolve_runtime",
]

logger = logging.getLogger(__name__)

RuntimeName = Literal["auto", "onnxruntime", "torch", "eager"]
RUNTIMES: Final[tuple[str, ...]] = get_args(RuntimeName)


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


def onnx_cache_path(cache_dir: Path, stem: str, identity: str) -> Path:
    """The cache file for a model identified by ``identity`` (encoder id, torch version,
    opset): ``<cache_dir>/<stem>-<sha256(identity)[:24]>.onnx``."""
    key = f"{identity}|torch={torch.__version__}|opset={ONNX_OPSET}"
    return cache_dir / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    outputs: tuple[str, ...] = ("features",),
) -> None:
    """Export ``module`` (input ``x`` (n, 3, H, W) float32; outputs named ``outputs``, by
    default one, ``features`` (n, d)) with a dynamic batch axis to ``path``, atomically
    (temporary file, then rename)."""
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
                output_names=list(outputs),
                dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in outputs}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def probe_batch(size: int) -> torch.Tensor:
    """Deterministic probe input (:func:`.lite0_onnx.probe_input`) as a tensor."""
    return torch.from_numpy(probe_input(size))


def min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine similarity between corresponding rows of two (n, d) tensors."""
    return lite0_min_row_cosine(a.detach().float().numpy(), b.detach().float().numpy())


class OnnxForward:
    """Runs an exported image tower with ONNX Runtime's CPU provider.

    Call with a float32 CPU batch (n, 3, H, W); returns float32 features (n, d) as a tensor.
    ``threads`` sets ``intra_op_num_threads`` (the same count torch uses, so
    ``MODERATION_TORCH_THREADS`` governs both). Thread-safe: ``InferenceSession.run`` is.
    """

    def __init__(self, path: Path, *, threads: int) -> None:
        self.path = path
        self._session: Any = ort_session(path, threads=max(1, threads))

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
