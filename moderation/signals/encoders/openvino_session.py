"""The encoder's ONNX model on OpenVINO's CPU plugin, called like an ONNX Runtime session.

Imports no torch and, until a session is made, not OpenVINO either (:func:`import_openvino`).
:func:`.onnx_model.model_session` makes the sessions, after the model file's digests check out;
:func:`.onnx_model.checked_session` runs the probe batch on each.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

#: The model with its batch axis fixed at 1, as OpenVINO IR (``.xml`` beside its ``.bin``) in
#: the model's compiled-model cache folder. A static shape lets the CPU plugin plan every layer
#: once: measured on the 2-core AMD EPYC (family 25 model 17, one thread, same run, medians of
#: 10 rounds), 9.2-9.5 ms of CPU per photo against 10.6-10.8 with the dynamic batch axis (at
#: batch 1 or 2), and the same features to the bit.
STATIC_MODEL: Final = "static-batch1.xml"
#: The model's outputs: ``features`` float32 (n, 1280), the pooled (not normalised) embedding,
#: and ``feature_map`` float32 (n, 1280, h, w), the map it pools, for the feature-map windows
#: (:mod:`.feature_windows`). The manifest lists them; a session whose map does not pool to its
#: features fails its probe.
MODEL_OUTPUTS: Final = ("features", "feature_map")
#: What ``inference_precision`` may ask of the CPU plugin: ``auto`` (bfloat16 where the CPU
#: computes it natively, :func:`native_bf16`, else float32), ``f32`` or ``bf16``.
InferencePrecision = Literal["auto", "f32", "bf16"]
INFERENCE_PRECISIONS: Final = ("auto", "f32", "bf16")


def import_openvino() -> Any:
    """The ``openvino`` package, imported without its model-conversion API.

    ``openvino/__init__.py`` ends with ``from openvino.tools.ovc import convert_model`` inside
    ``try: ... except ImportError``; that API (and the telemetry, HTTP and e-mail modules it
    pulls in) is about a third of the package's import time and is never used here, since the
    ONNX model is read directly. A ``None`` entry in ``sys.modules`` makes that one import fail
    (the import system's documented way of blocking a module), and is removed afterwards so a
    later explicit ``import openvino.tools.ovc`` works.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    modules: dict[str, Any] = sys.modules  # a None entry blocks an import
    blocked = "openvino.tools.ovc" not in modules
    if blocked:
        modules["openvino.tools.ovc"] = None
    try:
        import openvino
    finally:
        if blocked and modules.get("openvino.tools.ovc", 0) is None:
            del modules["openvino.tools.ovc"]
    return openvino


def native_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively on this CPU (``BF16`` among
    its ``OPTIMIZATION_CAPABILITIES``: AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(core: Any, wanted: InferencePrecision) -> Literal["f32", "bf16"]:
    """``wanted``, with ``auto`` made ``bf16`` where :func:`native_bf16` holds, else ``f32``.

    Raises:
        ValueError: ``wanted`` is not one of :data:`INFERENCE_PRECISIONS`.
    """
    if wanted not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"unknown inference precision {wanted!r}; expected one of {INFERENCE_PRECISIONS}"
        )
    if wanted == "auto":
        return "bf16" if native_bf16(core) else "f32"
    return "f32" if wanted == "f32" else "bf16"


def _batch_of_one(core: Any, onnx: Path) -> Any:
    """The ONNX model read by ``core`` with the batch axis of input ``x`` fixed at 1 (the other
    axes as exported: (1, 3, H, W))."""
    model = core.read_model(str(onnx))
    shape = model.input("x").get_partial_shape()
    shape[0] = 1
    model.reshape({"x": shape})
    return model


def static_model(ov: Any, core: Any, onnx: Path, folder: Path | None) -> Any:
    """What to compile: the path of :data:`STATIC_MODEL` in ``folder``, written there from
    ``onnx`` (weights kept float32) when missing; without a folder, the reshaped model itself.

    The IR is written under a temporary name and renamed, ``.bin`` first, so a concurrent
    process reads a whole file of the same content. A damaged IR gives features that fail the
    probe: :func:`.onnx_model.checked_session` then removes the folder and compiles afresh.

    Raises:
        RuntimeError: OpenVINO cannot read ``onnx``.
        OSError: ``folder`` is not writable.
    """
    if folder is None:
        return _batch_of_one(core, onnx)
    xml = folder / STATIC_MODEL
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        temporary = folder / f".{os.getpid()}-{threading.get_ident()}-{STATIC_MODEL}"
        try:
            ov.save_model(_batch_of_one(core, onnx), str(temporary), compress_to_fp16=False)
            os.replace(temporary.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(temporary, xml)
        finally:
            for leftover in (temporary, temporary.with_suffix(".bin")):
                leftover.unlink(missing_ok=True)
    return str(xml)


class OpenVinoSession:
    """The ONNX model compiled by OpenVINO for the CPU, called like an ONNX Runtime session.

    OpenVINO's CPU plugin reads the same ``.onnx`` file and, measured on the development
    machine (Intel Xeon, 2 cores, one thread, batch 1), embeds a photo in about 5.5 ms of CPU
    against ONNX Runtime's 8.7-9.6 ms, with the same features at f32 (least per-row cosine to
    ONNX Runtime's 1.0000000 over 96 photos; README "Performance").

    ``precision`` (:data:`InferencePrecision`) is the plugin's ``INFERENCE_PRECISION_HINT``:
    ``f32`` (the default), ``bf16``, or ``auto``: bfloat16 where the CPU has it natively
    (:func:`native_bf16`), as OpenVINO itself would by default, else float32. The model, its
    weights and the encoder id stay the same (as float16 on CUDA does for the PyTorch
    encoder); the embeddings move a little: measured on the 2-core AMD EPYC (family 25 model
    17, AVX512-BF16, one thread), 5.3 against 9.2 ms of CPU per photo, cosine to f32 over the
    458 development photos min 0.9932, median 0.9994 (README "Inference precision", where it
    also fails issue 20's quality rule). :attr:`precision` says what the compiled model runs.

    ``threads`` sets ``INFERENCE_NUM_THREADS`` for one call, no core pinning (the machine is
    shared with the decode threads); ``streams`` calls run at the same time (OpenVINO's
    ``NUM_STREAMS``, one thread each when ``threads`` is 1). With one stream, calls from several
    threads wait for each other: measured on the 2-core AMD EPYC, two threads calling a
    one-thread, one-stream model got 8.8 ms of wall time per photo, the same as one thread, and
    4.5 ms with two streams of a thread each, at the same CPU time per photo (8.6-9.0 ms).
    Thread-safe: each calling thread gets its own infer request. The model runs with its batch
    axis fixed at 1 (:data:`STATIC_MODEL`), one image per call.

    ``cache_dir``, when given, is OpenVINO's ``CACHE_DIR``: the compiled model is stored there
    and imported by later processes instead of being compiled again (0.15-0.2 s of CPU at each
    start). OpenVINO keys a file's blob by its path, the configuration and the CPU, not by the
    file's content, so the caller passes a folder named after the ``.onnx`` file's verified
    digest (:func:`.onnx_model.checked_session`): another model never meets this one's blob.
    The folder sits in the private model cache beside the manifest and also holds the
    static-batch IR; the probe check runs on the imported model as on a compiled one.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        streams: int = 1,
        cache_dir: Path | None = None,
        precision: InferencePrecision = "f32",
    ) -> None:
        ov = import_openvino()
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": resolve_precision(core, precision),
            "INFERENCE_NUM_THREADS": threads * streams,
            "NUM_STREAMS": streams,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        model = None
        if cache_dir is not None:
            try:
                cache_dir.parent.mkdir(mode=0o700, exist_ok=True)
                cache_dir.mkdir(mode=0o700, exist_ok=True)
                model = static_model(ov, core, path, cache_dir)
                config["CACHE_DIR"] = str(cache_dir)
            except OSError as exc:  # read-only cache: reshape and compile every time
                logger.info("no OpenVINO model cache at %s (%s)", cache_dir, exc)
        if model is None:
            model = static_model(ov, core, path, None)
        # A path where there is a cache: with a cached blob OpenVINO skips reading the file.
        self._compiled = core.compile_model(model, "CPU", config)
        # What the plugin settled on (a CPU without bfloat16 may fall back to f32).
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision: Literal["f32", "bf16"] = "bf16" if hint == ov.Type.bf16 else "f32"
        self._outputs = {
            name: output
            for output in self._compiled.outputs
            for name in output.get_names()
            if name in MODEL_OUTPUTS
        }
        self._local = threading.local()

    def run(
        self, output_names: list[str], feeds: dict[str, npt.NDArray[np.float32]]
    ) -> list[npt.NDArray[np.float32]]:
        """The named outputs (of :data:`MODEL_OUTPUTS`: ``features`` float32 (n, d),
        ``feature_map`` float32 (n, d, h, w)) for ``feeds["x"]`` float32 (n, 3, H, W), as
        ``InferenceSession.run(names, {"x": ...})`` returns them (one call per row).

        Raises:
            ValueError: a name is not one of the model's outputs.
        """
        unknown = [name for name in output_names if name not in self._outputs]
        if unknown:
            raise ValueError(f"the encoder model has no output {unknown}: {list(self._outputs)}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        batch = np.ascontiguousarray(feeds["x"], dtype=np.float32)
        rows: list[list[npt.NDArray[np.float32]]] = [[] for _ in output_names]
        for i in range(len(batch)):
            result = request.infer({"x": batch[i : i + 1]}, share_inputs=True)
            for out, name in zip(rows, output_names, strict=True):
                out.append(np.array(result[self._outputs[name]], dtype=np.float32, copy=True))
        return [np.concatenate(out).astype(np.float32, copy=False) for out in rows]
