"""Building the default encoder's ONNX model files (needs torch; serving them does not).

:func:`build_model_files` exports the eager PyTorch image tower of
:class:`.timm_backend.EfficientNetLite0Encoder` with ``torch.onnx.export``, checks the ONNX
Runtime session against the eager model (on the probe batch; int8 on calibration images),
and writes the manifest described
in :mod:`.lite0_onnx`. ``precision="int8"`` then quantises the float model statically with
``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel weights, activations
calibrated on :data:`CALIBRATION_IMAGES` of the caller's images, MinMax), checked against the
eager model at the looser :data:`INT8_MIN_COSINE`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from moderation.signals.encoders.base import sha256_file
from moderation.signals.encoders.fastpath import export_onnx
from moderation.signals.encoders.lite0 import LITE0, LiteVariant
from moderation.signals.encoders.onnx_model import (
    CALIBRATION_IMAGES,
    MANIFEST_FORMAT,
    ONNX_OPSET,
    PROBE_MIN_COSINE,
    PROBE_SEED,
    FastPathError,
    ModelFiles,
    Precision,
    min_row_cosine,
    ort_session,
    preprocessing_for,
    probe_input,
    write_atomically,
)
from moderation.signals.encoders.openvino_session import MODEL_OUTPUTS

logger = logging.getLogger(__name__)

#: Least per-row cosine between int8 and eager features on the probe batch; a quantisation
#: gone wrong (wrong ranges, a broken graph) lands far below.
INT8_MIN_COSINE: Final = 0.8


def _eager_net(weights_path: Path, variant: LiteVariant) -> torch.nn.Module:
    from moderation.signals.encoders.timm_backend import EfficientNetLite0Encoder, EmbeddingMapNet

    encoder = EfficientNetLite0Encoder(
        device=torch.device("cpu"), weights_path=weights_path, runtime="eager", variant=variant
    )
    return EmbeddingMapNet(encoder.load(), encoder.pool).eval()


def build_model_files(
    weights_path: Path,
    files: ModelFiles,
    *,
    precision: Precision = "fp32",
    calibration: Sequence[npt.NDArray[np.float32]] = (),
    variant: LiteVariant = LITE0,
) -> dict[str, Any]:
    """Export ``variant``'s encoder built from ``weights_path`` to ``files`` (model, then
    manifest, each written atomically) and return the manifest.

    ``calibration``: encoder input batches (n, 3, s, s) float32 for int8, s the variant's
    input side; ignored for fp32.

    Raises:
        FastPathError: the exported model disagrees with the eager one on the probe batch, or
            int8 was asked for without calibration batches.
    """
    files.onnx.parent.mkdir(parents=True, exist_ok=True)
    net = _eager_net(weights_path, variant)
    probe = probe_input(variant.input_size)
    export_onnx(net, torch.from_numpy(probe), files.onnx, MODEL_OUTPUTS)
    # fp32 must match the eager model on the noise probe; int8 only on real images (its
    # calibrated activation ranges clip noise: 0.75 measured), at a looser floor.
    check, floor = probe, PROBE_MIN_COSINE
    if precision == "int8":
        if not calibration:
            raise FastPathError("int8 quantisation needs calibration images")
        _quantise(files.onnx, calibration)
        check, floor = np.concatenate(list(calibration))[:8], INT8_MIN_COSINE
    session = ort_session(files.onnx)
    with torch.inference_mode():
        expected = net(torch.from_numpy(check))[0].numpy()
    agreement = min_row_cosine(session.run(["features"], {"x": check})[0], expected)
    if agreement < floor:
        files.onnx.unlink(missing_ok=True)
        raise FastPathError(
            f"the ONNX export at {files.onnx} does not reproduce the eager model "
            f"(min cosine {agreement:.6f} < {floor})"
        )
    (features,) = session.run(["features"], {"x": probe})
    import onnxruntime

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source_weights": weights_path.name,
        "source_weights_sha256": sha256_file(weights_path),
        "preprocessing": preprocessing_for(precision, variant),
        "precision": precision,
        "onnx_sha256": sha256_file(files.onnx),
        "opset": ONNX_OPSET,
        "outputs": list(MODEL_OUTPUTS),
        "built_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "probe_seed": PROBE_SEED,
        "min_cosine_to_eager": agreement,
        "probe_features": np.asarray(features, dtype=np.float32).tolist(),
    }
    write_atomically(files.manifest, json.dumps(manifest).encode())
    logger.info("built %s (%s, probe cosine %.6f)", files.onnx, precision, agreement)
    return manifest


def _quantise(path: Path, calibration: Sequence[npt.NDArray[np.float32]]) -> None:
    """Replace the float model at ``path`` by its static int8 quantisation (QDQ)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rows = np.concatenate(list(calibration))[:CALIBRATION_IMAGES]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._rows = iter(rows[i : i + 8] for i in range(0, len(rows), 8))

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            batch = next(self._rows, None)
            return None if batch is None else {"x": batch}

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared))
        quantised = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantised),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # Convolutions only: the GeM pooling (clamp, cube, mean, cube root) stays float;
            # quantised, its cube amplifies the rounding.
            op_types_to_quantize=["Conv"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        os.replace(quantised, path)
