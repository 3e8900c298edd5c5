"""The default encoder's torch-free ONNX path (issue 20): the model built once from the packaged
weights, checked by SHA-256 and a probe batch at every load, rebuilt when stale or tampered,
embeddings equal to the PyTorch model's; and the serving entry points (``moderation screen``,
the worker's runtime, the web app) never import torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import moderation.signals.encoders.onnx_model as onnx_model
from moderation.signals.encoders import create_encoder
from moderation.signals.encoders.base import sha256_file
from moderation.signals.encoders.lite0_onnx import FastPathError, OnnxLite0Encoder
from moderation.signals.encoders.openvino_session import STATIC_MODEL
from moderation.signals.encoders.timm_backend import EfficientNetLite0Encoder
from tests.conftest import skimage_photo, skimage_photo_path

REPO = Path(__file__).resolve().parents[2]
#: Modules the serving path must not load (torch's own and what pulls it in).
FORBIDDEN = ("torch", "torchvision", "timm", "open_clip")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the fp32 model, built once for the module."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    OnnxLite0Encoder(cache_dir=cache).load()
    return cache


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built cache, for tests that damage it."""
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    return copy


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    images = [skimage_photo(name) for name in ("chelsea", "coffee", "rocket", "astronaut")]
    images.append(images[0].resize((97, 301)))
    return images


def test_factory_gives_the_torch_free_encoder_on_the_cpu(tmp_path: Path) -> None:
    encoder = create_encoder("timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path)
    assert isinstance(encoder, OnnxLite0Encoder) and not encoder.uses_torch
    assert str(encoder.device) == "cpu" and encoder.device.type == "cpu"
    # The PyTorch runtimes stay available by name.
    torch_encoder = create_encoder("timm/efficientnet_lite0", device="cpu", runtime="torch")
    assert isinstance(torch_encoder, EfficientNetLite0Encoder)


def test_onnx_embeddings_equal_the_pytorch_model(built: Path, photos: list[Image.Image]) -> None:
    eager = EfficientNetLite0Encoder(device=torch.device("cpu"), runtime="eager")
    onnx = OnnxLite0Encoder(cache_dir=built)
    assert onnx.id == eager.id  # same snapshots, same blocklists
    vectors = onnx.encode(photos, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (len(photos), 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * eager.encode(photos), axis=1)
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(onnx.encode(photos, batch_size=5), vectors, atol=1e-5)


def test_manifest_names_the_source_weights_and_the_model(built: Path) -> None:
    encoder = OnnxLite0Encoder(cache_dir=built)
    files = encoder.files
    manifest = json.loads(files.manifest.read_text())
    assert manifest["source_weights_sha256"] == sha256_file(encoder.weights_path)
    assert manifest["source_weights_sha256"] == encoder.id.weights_sha256
    assert manifest["onnx_sha256"] == sha256_file(files.onnx)
    assert manifest["precision"] == "fp32" and manifest["preprocessing"] == encoder.preprocessing
    assert np.asarray(manifest["probe_features"]).shape == (2, 1280)


def test_valid_model_is_reused_not_rebuilt(cache: Path, photos: list[Image.Image]) -> None:
    files = OnnxLite0Encoder(cache_dir=cache).files
    stamps = (files.onnx.stat().st_mtime_ns, files.manifest.stat().st_mtime_ns)
    OnnxLite0Encoder(cache_dir=cache).encode(photos[:1])
    assert (files.onnx.stat().st_mtime_ns, files.manifest.stat().st_mtime_ns) == stamps


def test_tampered_model_is_rebuilt(cache: Path, photos: list[Image.Image]) -> None:
    reference = OnnxLite0Encoder(cache_dir=cache).encode(photos)
    files = OnnxLite0Encoder(cache_dir=cache).files
    data = bytearray(files.onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a weight tensor
    files.onnx.write_bytes(bytes(data))
    encoder = OnnxLite0Encoder(cache_dir=cache)
    np.testing.assert_allclose(encoder.encode(photos), reference, atol=1e-5)
    assert sha256_file(files.onnx) == json.loads(files.manifest.read_text())["onnx_sha256"]


def test_model_from_other_weights_is_rebuilt(cache: Path) -> None:
    files = OnnxLite0Encoder(cache_dir=cache).files
    manifest = json.loads(files.manifest.read_text())
    manifest["source_weights_sha256"] = "0" * 64
    files.manifest.write_text(json.dumps(manifest))
    OnnxLite0Encoder(cache_dir=cache).load()
    rebuilt = json.loads(files.manifest.read_text())
    assert rebuilt["source_weights_sha256"] == sha256_file(OnnxLite0Encoder().weights_path)


def test_model_failing_its_probe_is_an_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No float model agrees with its recorded probe at cosine > 1: the encoder rebuilds once,
    # then refuses rather than embed with a model it cannot vouch for.
    monkeypatch.setattr(onnx_model, "PROBE_MIN_COSINE", 1.01)
    with pytest.raises(FastPathError, match="fails its own checks"):
        OnnxLite0Encoder(cache_dir=cache).load()


# --- the serving path's import graph ---------------------------------------------------------

_REPORT = (
    "import json, sys; print(json.dumps(sorted(m for m in {forbidden!r} if m in sys.modules)))"
)


def _run(code: str, data_dir: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(
        MODERATION_DATA_DIR=str(data_dir),
        MODERATION_LOG_LEVEL="WARNING",
        MODERATION_SECRET_KEY="test-secret-key-" + "x" * 40,
        PYTHONPATH=str(REPO),
    )
    script = code + "\n" + _REPORT.format(forbidden=FORBIDDEN)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


@pytest.fixture(scope="module")
def data_dir(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised data directory whose model cache already holds the built model."""
    from moderation.config import load_settings
    from moderation.service.runtime import prepared_runtime

    path = tmp_path_factory.mktemp("serving") / "var"
    prepared_runtime(load_settings(data_dir=path))
    shutil.copytree(built, path / "cache", dirs_exist_ok=True)
    return path


def test_moderation_screen_imports_no_torch(data_dir: Path) -> None:
    photo = skimage_photo_path("chelsea")
    code = (
        "import sys\nfrom moderation.cli import main\n"
        f"main(['screen', '--json', {str(photo)!r}], standalone_mode=False)\n"
    )
    assert _run(code, data_dir) == []


def test_worker_runtime_imports_no_torch(data_dir: Path) -> None:
    # What a screening worker process does at start (worker_process_init): load the encoder
    # and the snapshot; then one screening.
    code = (
        "import workers.tasks as tasks\n"
        "rt = tasks.runtime()\n"
        "screener = rt.screener()\n"
        f"screener.screen_bytes([open({str(skimage_photo_path('coffee'))!r}, 'rb').read()])\n"
    )
    assert _run(code, data_dir) == []


def test_web_app_imports_no_torch(data_dir: Path) -> None:
    code = (
        "from admin import create_app\n"
        "client = create_app().test_client()\n"
        "assert client.get('/status/live').status_code == 200\n"
    )
    assert _run(code, data_dir) == []


def test_preloaded_encoder_is_the_one_the_runtime_serves(data_dir: Path) -> None:
    from moderation.config import load_settings
    from moderation.service.encoder_preload import preload_encoder
    from moderation.service.runtime import Runtime

    settings = load_settings(data_dir=data_dir, device="cpu", encoder_runtime="onnxruntime")
    thread = preload_encoder(settings)
    assert thread is not None
    thread.join(timeout=120)
    runtime = Runtime(settings)
    assert runtime.encoder.loaded and isinstance(runtime.encoder, OnnxLite0Encoder)
    assert preload_encoder(settings) is None  # loaded already: nothing to start
    # PyTorch runtimes are not preloaded: a second thread importing torch only contends.
    assert preload_encoder(settings.model_copy(update={"encoder_runtime": "torch"})) is None


def test_int8_is_a_different_encoder_id_and_needs_calibration_images(tmp_path: Path) -> None:
    fp32 = OnnxLite0Encoder(cache_dir=tmp_path)
    int8 = create_encoder(
        "timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path, precision="int8"
    )
    assert isinstance(int8, OnnxLite0Encoder) and int8.precision == "int8"
    # int8 embeddings differ, so they must never meet fp32 snapshots.
    assert int8.id != fp32.id and int8.id.preprocessing.endswith(",precision=int8")
    assert int8.files.onnx != fp32.files.onnx
    with pytest.raises(FastPathError, match="MODERATION_ENCODER_CALIBRATION_DIR"):
        int8.load()
    with pytest.raises(ValueError, match="precision"):
        create_encoder("timm/efficientnet_lite0", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        create_encoder("timm/efficientnet_lite0", device="cpu", runtime="torch", precision="int8")


# --- OpenVINO, and the start-up's digest cache ------------------------------------------------


def test_openvino_runs_the_same_model_with_the_same_embeddings(
    built: Path, photos: list[Image.Image]
) -> None:
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    ort = OnnxLite0Encoder(cache_dir=built)
    ov = OnnxLite0Encoder(cache_dir=built, backend="openvino", inference_precision="f32")
    assert ov.id == ort.id and ov.runtime == "openvino"  # same snapshots, same blocklists
    reference = ort.encode(photos, batch_size=2)
    vectors = ov.encode(photos, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    # At f32 the same features to rounding (bfloat16: tests/unit/test_inference_precision.py).
    assert np.sum(vectors * reference, axis=1).min() >= 0.99999
    np.testing.assert_allclose(ov.encode(photos, batch_size=5), vectors, atol=1e-5)


def test_openvino_compiled_model_is_cached_per_model_digest(
    cache: Path, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    import openvino

    assert "convert_model" not in vars(openvino) or "openvino.tools.ovc" in sys.modules
    first = OnnxLite0Encoder(cache_dir=cache, backend="openvino")
    vectors = first.encode(photos, batch_size=2)
    digest = json.loads(first.files.manifest.read_text())["onnx_sha256"]
    folder = cache / onnx_model.OPENVINO_CACHE / digest
    blobs = sorted(folder.iterdir())
    assert blobs and folder.stat().st_mode & 0o077 == 0
    assert (folder / STATIC_MODEL).is_file()  # the batch-of-one IR compiled from the .onnx
    # A second process (here: a new session) imports the blob: same features, no new blob.
    again = OnnxLite0Encoder(cache_dir=cache, backend="openvino")
    again._model = onnx_model.checked_session(
        again.files,
        weights_sha256=again.id.weights_sha256,
        preprocessing=again.preprocessing,
        precision="fp32",
        threads=1,
        backend="openvino",
    )
    assert again._model is not None and sorted(folder.iterdir()) == blobs
    assert np.array_equal(again.encode(photos, batch_size=2), vectors)
    # A blob that gives other features fails the probe like a tampered model: it is discarded
    # and the model compiled afresh.
    real = onnx_model.model_session
    calls: list[bool] = []

    def wrong_once(path: Path, **kwargs: object) -> object:
        session = real(path, **kwargs)  # type: ignore[arg-type]
        calls.append(folder.exists())
        if len(calls) > 1:
            return session
        run = session.run
        session.run = lambda names, feeds: [run(names, feeds)[0][::-1].copy()]
        return session

    monkeypatch.setattr(onnx_model, "model_session", wrong_once)
    tampered = OnnxLite0Encoder(cache_dir=cache, backend="openvino")
    assert np.array_equal(tampered.encode(photos, batch_size=2), vectors)
    assert calls == [True, True] and sorted(folder.iterdir()) != []


def test_openvino_one_thread_per_call_runs_calls_side_by_side(
    built: Path, photos: list[Image.Image]
) -> None:
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    single = OnnxLite0Encoder(cache_dir=built, backend="openvino", inference_precision="f32")
    lanes = OnnxLite0Encoder(
        cache_dir=built, backend="openvino", threads=1, inference_precision="f32"
    )
    assert single.concurrent_calls == 1 and lanes.concurrent_calls == onnx_model.cpu_count()
    reference = single.encode(photos, batch_size=2)
    inputs = lanes.preprocess(photos)
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: lanes.encode_inputs(inputs, batch_size=2), range(6)))
    for vectors in runs:  # one stream per core, one infer request per thread: same features
        np.testing.assert_allclose(vectors, reference, atol=1e-6)


def test_auto_prefers_openvino_except_for_small_jobs(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    from moderation.signals.encoders import OPENVINO_MIN_IMAGES, runtime_for_job

    auto = create_encoder("timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path)
    assert isinstance(auto, OnnxLite0Encoder) and auto.runtime == "openvino"
    ort = create_encoder(
        "timm/efficientnet_lite0", device="cpu", runtime="onnxruntime", cache_dir=tmp_path
    )
    assert isinstance(ort, OnnxLite0Encoder) and ort.runtime == "onnxruntime"
    # int8 (QDQ, evaluated on ONNX Runtime) stays on ONNX Runtime under auto.
    int8 = create_encoder(
        "timm/efficientnet_lite0", device="cpu", cache_dir=tmp_path, precision="int8"
    )
    assert isinstance(int8, OnnxLite0Encoder) and int8.runtime == "onnxruntime"
    with pytest.raises(ValueError, match="fp32"):
        create_encoder(
            "timm/efficientnet_lite0", device="cpu", runtime="openvino", precision="int8"
        )
    assert runtime_for_job("auto", 0, 1) == ("onnxruntime", 0)
    assert runtime_for_job("openvino", 0, 1) == ("openvino", 0)
    # A long job: one inference thread beside the pipeline's, unless threads were configured.
    assert runtime_for_job("auto", 0, OPENVINO_MIN_IMAGES) == ("auto", 1)
    assert runtime_for_job("auto", 4, OPENVINO_MIN_IMAGES) == ("auto", 4)


def test_model_digests_are_hashed_once_per_file_version(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    OnnxLite0Encoder(cache_dir=cache).load()  # records both digests under this cache's paths
    hashed: list[Path] = []
    real = onnx_model.sha256_file
    monkeypatch.setattr(onnx_model, "sha256_file", lambda p: hashed.append(p) or real(p))
    OnnxLite0Encoder(cache_dir=cache).load()
    assert hashed == []  # neither the weights nor the model hashed again
    files = OnnxLite0Encoder(cache_dir=cache).files
    before = files.onnx.stat()
    data = bytearray(files.onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    files.onnx.write_bytes(bytes(data))
    os.utime(files.onnx, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as before
    OnnxLite0Encoder(cache_dir=cache).load()  # detected (status-change time), rebuilt
    assert files.onnx in hashed
    assert sha256_file(files.onnx) == json.loads(files.manifest.read_text())["onnx_sha256"]


def test_cached_digest_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = onnx_model.cached_sha256(path, tmp_path / "cache")
    assert first == sha256_file(path) and (tmp_path / "cache" / onnx_model.DIGESTS_FILE).exists()
    info = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert onnx_model.cached_sha256(path, tmp_path / "cache") == sha256_file(path) != first
    (tmp_path / "cache" / onnx_model.DIGESTS_FILE).write_text("not json")
    assert onnx_model.cached_sha256(path, tmp_path / "cache") == sha256_file(path)
