"""OpenVINO's inference precision (issue 20): bfloat16 where the CPU computes it natively, the
same model, weights and encoder id, embeddings within cosine 0.995 of float32, and the setting
that pins float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation.config import Settings
from moderation.signals.encoders import create_encoder
from moderation.signals.encoders.lite0_onnx import OnnxLite0Encoder
from moderation.signals.encoders.onnx_model import (
    PROBE_MIN_COSINE,
    PROBE_MIN_COSINE_BF16,
    probe_min_cosine,
)
from tests.conftest import skimage_photo

pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")

from moderation.signals.encoders.openvino_session import (
    import_openvino,
    native_bf16,
    resolve_precision,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("onnx-cache")
    OnnxLite0Encoder(cache_dir=cache).load()
    return cache


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    names = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left")
    return [skimage_photo(name) for name in names]


def test_auto_is_bfloat16_exactly_where_the_cpu_has_it() -> None:
    core = import_openvino().Core()
    native = native_bf16(core)
    assert resolve_precision(core, "auto") == ("bf16" if native else "f32")
    assert resolve_precision(core, "f32") == "f32"
    assert resolve_precision(core, "bf16") == "bf16"
    with pytest.raises(ValueError, match="inference precision"):
        resolve_precision(core, "fp16")  # type: ignore[arg-type]


def test_bfloat16_embeddings_stay_within_cosine_0995_of_float32(
    built: Path, photos: list[Image.Image]
) -> None:
    f32 = OnnxLite0Encoder(cache_dir=built, backend="openvino", inference_precision="f32")
    bf16 = OnnxLite0Encoder(cache_dir=built, backend="openvino", inference_precision="bf16")
    assert f32.id == bf16.id  # the same blocklists serve both
    assert f32.load().precision == "f32"
    if native_bf16(import_openvino().Core()):
        assert bf16.load().precision == "bf16"
    # (Elsewhere the plugin may settle on f32; the session says which.)
    reference, vectors = f32.encode(photos), bf16.encode(photos)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    cosines = np.sum(reference * vectors, axis=1)
    assert cosines.min() >= 0.995, cosines
    if bf16.load().precision == "bf16":
        assert cosines.min() < 1.0 - 1e-6  # it really computed in bfloat16
    # The bfloat16 session passed its own, looser probe; a float32 one keeps the strict one.
    assert probe_min_cosine(bf16.load()) == (
        PROBE_MIN_COSINE_BF16 if bf16.load().precision == "bf16" else PROBE_MIN_COSINE
    )
    assert probe_min_cosine(f32.load()) == PROBE_MIN_COSINE


def test_the_setting_reaches_the_configured_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moderation.service.encoder_preload import configured_encoder

    monkeypatch.setenv("MODERATION_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODERATION_ENCODER_RUNTIME", "openvino")
    assert Settings().inference_precision == "f32"  # bfloat16 failed the quality rule
    assert configured_encoder(Settings()).inference_precision == "f32"  # type: ignore[attr-defined]
    monkeypatch.setenv("MODERATION_INFERENCE_PRECISION", "auto")
    assert configured_encoder(Settings()).inference_precision == "auto"  # type: ignore[attr-defined]
    monkeypatch.setenv("MODERATION_INFERENCE_PRECISION", "bf16")
    encoder = configured_encoder(Settings())
    assert isinstance(encoder, OnnxLite0Encoder) and encoder.inference_precision == "bf16"
    monkeypatch.setenv("MODERATION_INFERENCE_PRECISION", "fp16")
    with pytest.raises(ValueError, match="inference_precision"):
        Settings()
    with pytest.raises(ValueError, match="inference precision"):
        create_encoder(
            "timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path, inference_precision="x"
        )
