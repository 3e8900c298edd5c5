"""The encoder's fast paths (ONNX Runtime, channels_last, numpy preprocessing) reproduce the
eager PyTorch embeddings; runtime choice and the ONNX cache's self-check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from moderation.signals.encoders import create_encoder
from moderation.signals.encoders.fastpath import (
    PROBE_MIN_COSINE,
    FastPathError,
    build_onnx_forward,
    onnx_cache_path,
    resolve_runtime,
)
from moderation.signals.encoders.timm_backend import (
    EfficientNetLite0Encoder,
    _resize_transform,
    square_pixels,
)
from tests.conftest import skimage_photo

LITE0 = "timm/efficientnet_lite0"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    names = ("chelsea", "coffee", "rocket", "astronaut", "camera")
    images = [skimage_photo(name) for name in names]
    # Odd sizes and a tiny image exercise the resize as well.
    images.append(images[0].resize((97, 301)))
    images.append(Image.new("RGB", (3, 2), (200, 10, 40)))
    return images


@pytest.fixture(scope="module")
def eager() -> EfficientNetLite0Encoder:
    encoder = EfficientNetLite0Encoder(device=CPU, runtime="eager")
    encoder.load()
    return encoder


def _torchvision_eager(encoder: EfficientNetLite0Encoder, images: list[Image.Image]) -> np.ndarray:
    """The embeddings the encoder produced before the fast paths: torchvision transforms and
    the eager NCHW model."""
    transform = _resize_transform("square224")
    batch = torch.stack([transform(image) for image in images])
    from moderation.signals.encoders.base import l2_normalise
    from moderation.signals.encoders.timm_backend import pool_features

    with torch.inference_mode():
        model = encoder.load()
        features = pool_features(model.forward_features(batch), encoder.pool)  # type: ignore[operator]
    return l2_normalise(features)


def test_numpy_preprocessing_equals_torchvision(photos: list[Image.Image]) -> None:
    transform = _resize_transform("square224")
    for image in photos:
        expected = transform(image).numpy()
        actual = square_pixels(image)
        assert actual.shape == expected.shape == (3, 224, 224)
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch", "eager"])
def test_every_runtime_reproduces_eager_pytorch(
    runtime: str, eager: EfficientNetLite0Encoder, photos: list[Image.Image], tmp_path: Path
) -> None:
    reference = _torchvision_eager(eager, photos)
    encoder = EfficientNetLite0Encoder(device=CPU, runtime=runtime, cache_dir=tmp_path)
    assert encoder.runtime == runtime
    vectors = encoder.encode(photos, batch_size=4)
    cosines = np.sum(vectors * reference, axis=1)
    assert cosines.shape == (len(photos),)
    assert cosines.min() >= 0.99, cosines
    # In practice the paths agree far more closely than the 0.99 requirement.
    assert cosines.min() >= 0.9999, cosines
    assert encoder.id == eager.id  # the runtime does not change what an embedding means


def test_onnx_export_is_cached_and_reused(tmp_path: Path, photos: list[Image.Image]) -> None:
    first = EfficientNetLite0Encoder(device=CPU, runtime="onnxruntime", cache_dir=tmp_path)
    first.load()
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = EfficientNetLite0Encoder(device=CPU, runtime="onnxruntime", cache_dir=tmp_path)
    np.testing.assert_allclose(second.encode(photos[:2]), first.encode(photos[:2]), atol=1e-5)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not exported again


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch", "eager"])
def test_runtime_setup_leaves_the_model_in_eval_mode(runtime: str, tmp_path: Path) -> None:
    # A fresh ONNX export once left BatchNorm in training mode: classify() then gave noise.
    encoder = EfficientNetLite0Encoder(device=CPU, runtime=runtime, cache_dir=tmp_path)
    model = encoder.load()
    assert not any(module.training for module in model.modules())
    logits = encoder.classify([skimage_photo("chelsea")])
    assert int(logits[0].argmax()) in range(281, 286)  # ImageNet's cat classes


def test_corrupt_or_foreign_cache_file_is_replaced(
    tmp_path: Path, eager: EfficientNetLite0Encoder, photos: list[Image.Image]
) -> None:
    # A garbage file under the cache name, then a valid ONNX model of a different network.
    encoder = EfficientNetLite0Encoder(device=CPU, runtime="onnxruntime", cache_dir=tmp_path)
    identity = f"{encoder.name}|{encoder.id.weights_sha256}|{encoder.preprocessing}"
    path = onnx_cache_path(tmp_path, "efficientnet_lite0", identity)
    path.write_bytes(b"not an onnx model")
    vectors = encoder.encode(photos[:3])
    assert path.stat().st_size > 1_000_000
    np.testing.assert_allclose(vectors, eager.encode(photos[:3]), atol=1e-4)

    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    other_path = tmp_path / "other.onnx"
    from moderation.signals.encoders.fastpath import export_onnx

    export_onnx(torch.nn.Sequential(other, torch.nn.Flatten()), torch.zeros(1, 3, 8, 8), path)
    export_onnx(torch.nn.Sequential(other, torch.nn.Flatten()), torch.zeros(1, 3, 8, 8), other_path)
    again = EfficientNetLite0Encoder(device=CPU, runtime="onnxruntime", cache_dir=tmp_path)
    np.testing.assert_allclose(again.encode(photos[:3]), vectors, atol=1e-5)


def test_an_export_that_cannot_reproduce_the_model_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    import moderation.signals.encoders.fastpath as fastpath

    monkeypatch.setattr(fastpath, "min_row_cosine", lambda a, b: PROBE_MIN_COSINE - 0.01)
    with pytest.raises(FastPathError, match="does not reproduce"):
        build_onnx_forward(module, input_size=8, cache_path=tmp_path / "m.onnx", threads=1)


def test_runtime_choice() -> None:
    cuda = torch.device("cuda")
    assert resolve_runtime("auto", CPU) == "onnxruntime"
    assert resolve_runtime("auto", cuda) == "torch"  # float16 + channels_last on CUDA
    assert resolve_runtime("torch", cuda) == "torch"
    assert resolve_runtime("eager", CPU) == "eager"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_runtime("onnxruntime", cuda)
    with pytest.raises(ValueError, match="unknown encoder runtime"):
        resolve_runtime("tensorrt", CPU)


def test_auto_falls_back_to_torch_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    import moderation.signals.encoders.fastpath as fastpath

    monkeypatch.setattr(fastpath, "onnxruntime_available", lambda: False)
    assert resolve_runtime("auto", CPU) == "torch"
    with pytest.raises(ValueError, match="needs the onnxruntime package"):
        resolve_runtime("onnxruntime", CPU)


def test_factory_passes_runtime_and_refuses_onnx_for_open_clip(tmp_path: Path) -> None:
    encoder = create_encoder(LITE0, device="cpu", runtime="torch", cache_dir=tmp_path)
    assert isinstance(encoder, EfficientNetLite0Encoder) and encoder.runtime == "torch"
    assert create_encoder(LITE0, device="cpu", runtime="eager", cache_dir=tmp_path) is not encoder
    with pytest.raises(ValueError, match="onnxruntime"):
        create_encoder("open_clip/ViT-B-32/laion2b_s34b_b79k", device="cpu", runtime="onnxruntime")


def test_faiss_gpu_is_chosen_only_with_a_cuda_encoder(
    runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device selection for FAISS GPU, exercised on the CPU: the runtime asks the cosine index
    for a GPU copy exactly when the encoder runs on CUDA (maybe_to_gpu's own choice is tested
    in test_index.py)."""
    from moderation.banks.index import CosineIndex

    calls: list[int] = []

    def use_gpu(self: CosineIndex, *, gpus: int | None = None) -> bool:
        calls.append(len(self))
        return False

    monkeypatch.setattr(CosineIndex, "use_gpu", use_gpu)
    encoder = runtime.encoder
    runtime.load_blocklist()
    assert calls == []
    monkeypatch.setattr(encoder, "device", torch.device("cuda"))
    runtime.load_blocklist()
    assert calls == [0]
