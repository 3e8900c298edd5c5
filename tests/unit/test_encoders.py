"""Encoders: the factory, EncoderId, device choice, EfficientNet-Lite0 with its packaged weights,
and open_clip loading a local checkpoint of a tiny randomly initialised model."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageOps

import moderation.signals.encoders as encoders
from moderation.signals.encoders import (
    DeviceUnavailableError,
    EncoderId,
    create_encoder,
    select_device,
)
from moderation.signals.encoders.base import state_dict_sha256
from moderation.signals.encoders.timm_backend import (
    EfficientNetLite0Encoder,
    PoolMode,
    ResizeMode,
    map_state_dict_by_position,
    packaged_weights_path,
)
from tests.conftest import imagenet_top1_on_photos_dev, skimage_photo

LITE0 = "timm/efficientnet_lite0"
# ImageNet-1k indices (timm's sorted-WordNet-id order).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup
ROCKET_CLASSES = {657, 744, 812}  # missile, projectile, space shuttle
TINY_ARCH = "moderation-test-tiny-vit"


@pytest.fixture(scope="session")
def lite0() -> EfficientNetLite0Encoder:
    """The default encoder's PyTorch model (``classify`` needs it) with its real weights, loaded
    once per session. The torch-free ONNX encoder is tested in test_encoder_onnx.py."""
    encoder = create_encoder(LITE0, device="cpu", runtime="torch")
    assert isinstance(encoder, EfficientNetLite0Encoder)
    encoder.load()
    return encoder


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [skimage_photo(name) for name in ("chelsea", "coffee", "rocket")]


# --- EncoderId --------------------------------------------------------------------------------


def test_encoder_id_round_trips_through_str() -> None:
    encoder_id = EncoderId("open_clip/ViT-B-32//srv/m|odels/x.pt", "ab" * 32, "size=224,pool=avg")
    text = str(encoder_id)
    assert text == "open_clip/ViT-B-32//srv/m|odels/x.pt|sha256=" + "ab" * 32 + "|size=224,pool=avg"
    assert EncoderId.parse(text) == encoder_id


@given(
    name=st.text(min_size=1).filter(lambda s: "\n" not in s and "\r" not in s),
    digest=st.binary(min_size=1).map(lambda b: hashlib.sha256(b).hexdigest()),
    preprocessing=st.text(min_size=1).filter(lambda s: not set(s) & {"|", "\n", "\r"}),
)
def test_encoder_id_parse_inverts_str(name: str, digest: str, preprocessing: str) -> None:
    encoder_id = EncoderId(name, digest, preprocessing)
    assert EncoderId.parse(str(encoder_id)) == encoder_id


@pytest.mark.parametrize(
    "text",
    [
        "timm/efficientnet_lite0",
        "timm/efficientnet_lite0|" + "ab" * 32 + "|pool=avg",
        "timm/efficientnet_lite0|sha256=abc|pool=avg",
        "timm/efficientnet_lite0|sha256=" + "AB" * 32 + "|pool=avg",
        "|sha256=" + "ab" * 32 + "|pool=avg",
        "timm/efficientnet_lite0|sha256=" + "ab" * 32 + "|",
    ],
)
def test_encoder_id_parse_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        EncoderId.parse(text)


def test_lite0_id_names_the_packaged_weights(lite0: EfficientNetLite0Encoder) -> None:
    encoder_id = lite0.id
    assert encoder_id.name == LITE0
    expected = hashlib.sha256(packaged_weights_path().read_bytes()).hexdigest()
    assert encoder_id.weights_sha256 == expected
    assert encoder_id.preprocessing == lite0.preprocessing
    assert "interp=bicubic" in encoder_id.preprocessing
    assert f"pool={lite0.pool}" in encoder_id.preprocessing
    assert EncoderId.parse(str(encoder_id)) == encoder_id


def test_encoder_id_changes_with_preprocessing_and_weights(
    lite0: EfficientNetLite0Encoder, tmp_path: Path
) -> None:
    cpu = torch.device("cpu")
    other_pool: PoolMode = "gem3" if lite0.pool == "avg" else "avg"
    regrouped = EfficientNetLite0Encoder(device=cpu, pool=other_pool)
    other_resize: ResizeMode = "short256_crop224" if lite0.resize == "square224" else "square224"
    resized = EfficientNetLite0Encoder(device=cpu, resize=other_resize, pool=lite0.pool)
    state = torch.load(packaged_weights_path(), weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.0
    retrained_path = tmp_path / "retrained.pth"
    torch.save(state, retrained_path)
    retrained = EfficientNetLite0Encoder(device=cpu, weights_path=retrained_path)

    ids = {lite0.id, regrouped.id, resized.id, retrained.id}
    assert len(ids) == 4
    assert regrouped.id.weights_sha256 == lite0.id.weights_sha256
    assert retrained.id.preprocessing == lite0.id.preprocessing
    assert retrained.id.weights_sha256 != lite0.id.weights_sha256


# --- factory ----------------------------------------------------------------------------------


def test_importing_the_package_loads_no_backend() -> None:
    code = (
        "import sys, moderation.signals.encoders as e; e.create_encoder('timm/efficientnet_lite0');"
        "print(sorted(m for m in ('timm', 'open_clip') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]"


def test_create_encoder_is_lazy_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders, "_cache", OrderedDict())
    encoder = create_encoder(LITE0, device="cpu")
    assert not encoder.loaded
    assert create_encoder(LITE0, device="cpu") is encoder
    assert create_encoder(LITE0, device="auto") is encoder  # auto resolves to the CPU here
    assert encoder.dim == 1280 and str(encoder.device) == "cpu"
    encoder.encode([skimage_photo("chelsea")])
    assert encoder.loaded


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "timm/resnet50", "open_clip", "open_clip/ViT-B-32", ""]
)
def test_unknown_encoder_name_lists_accepted_forms(name: str) -> None:
    with pytest.raises(ValueError, match=r"timm/efficientnet_lite0.*open_clip/<arch>/"):
        create_encoder(name, device="cpu")


# --- device -----------------------------------------------------------------------------------


def test_auto_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")


def test_explicit_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailableError, match="only 2 CUDA"):
        select_device("cuda:2")


@pytest.mark.parametrize("preference", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, preference: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        select_device(preference)
    with pytest.raises(DeviceUnavailableError):
        create_encoder(LITE0, device=preference)


@pytest.mark.parametrize("preference", ["gpu", "cuda:x", "mps0", ""])
def test_unknown_device_is_rejected(preference: str) -> None:
    with pytest.raises(ValueError, match="auto"):
        select_device(preference)


def test_float16_only_on_cuda() -> None:
    on_gpu = EfficientNetLite0Encoder(device=torch.device("cuda"))
    on_cpu = EfficientNetLite0Encoder(device=torch.device("cpu"))
    assert on_gpu.dtype == torch.float16
    assert on_cpu.dtype == torch.float32
    assert not on_gpu.loaded


# --- EfficientNet-Lite0 -----------------------------------------------------------------------


def test_encode_returns_unit_float32_rows(
    lite0: EfficientNetLite0Encoder, photos: list[Image.Image]
) -> None:
    vectors = lite0.encode(photos)
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different photos are different vectors.
    similarity = vectors @ vectors.T
    assert similarity[0, 1] < 0.9 and similarity[0, 2] < 0.9


def test_encode_is_deterministic_and_batch_independent(
    lite0: EfficientNetLite0Encoder, photos: list[Image.Image]
) -> None:
    batched = lite0.encode(photos, batch_size=3)
    again = lite0.encode(photos, batch_size=3)
    one_by_one = np.concatenate([lite0.encode([photo]) for photo in photos])
    odd_batches = lite0.encode(photos, batch_size=2)
    np.testing.assert_array_equal(batched, again)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(batched, odd_batches, atol=1e-5)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def test_edited_copies_are_nearest_to_their_original(lite0: EfficientNetLite0Encoder) -> None:
    names = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left")
    originals = [skimage_photo(name) for name in names]
    edits: list[Callable[[Image.Image], Image.Image]] = [
        lambda im: im.resize((im.width * 2 // 5, im.height * 2 // 5)),
        ImageOps.mirror,
        lambda im: ImageOps.grayscale(im).convert("RGB"),
        lambda im: _jpeg(im, 15),
    ]
    queries = [edit(im) for im in originals for edit in edits]
    sources = np.repeat(np.arange(len(originals)), len(edits))
    cosine = lite0.encode(queries) @ lite0.encode(originals).T
    assert (cosine.argmax(axis=1) == sources).all()
    same = cosine[np.arange(len(queries)), sources]
    cosine[np.arange(len(queries)), sources] = -1.0
    # Observed (squash + GeM): copies 0.70..0.98, different photos up to 0.49; the margin
    # between the two is what matters.
    assert same.min() > 0.6
    assert cosine.max() < 0.55
    assert same.min() - cosine.max() > 0.1


def test_encode_accepts_any_size(lite0: EfficientNetLite0Encoder) -> None:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((1, 1), (7, 500), (900, 30))
    ]
    vectors = lite0.encode(images)
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_of_nothing_is_an_empty_matrix(lite0: EfficientNetLite0Encoder) -> None:
    vectors = lite0.encode([])
    assert vectors.shape == (0, 1280) and vectors.dtype == np.float32


def test_encode_rejects_bad_input(lite0: EfficientNetLite0Encoder) -> None:
    photo = skimage_photo("chelsea")
    with pytest.raises(TypeError, match="sequence"):
        lite0.encode(photo)
    with pytest.raises(ValueError, match="mode 'L'"):
        lite0.encode([photo.convert("L")])
    with pytest.raises(ValueError, match="batch_size"):
        lite0.encode([photo], batch_size=0)


def test_lite0_has_no_text_tower(lite0: EfficientNetLite0Encoder) -> None:
    assert not lite0.has_text_tower
    with pytest.raises(NotImplementedError, match="no text tower"):
        lite0.encode_text(["a cat"])


@pytest.mark.parametrize(
    ("photo", "classes"),
    [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES), ("rocket", ROCKET_CLASSES)],
)
def test_packaged_weights_classify_photos(
    lite0: EfficientNetLite0Encoder, photo: str, classes: set[int]
) -> None:
    logits = lite0.classify([skimage_photo(photo)])
    assert logits.shape == (1, 1000) and logits.dtype == np.float32
    assert int(logits[0].argmax()) in classes


@pytest.mark.slow
def test_imagenet_top1_on_photos_dev(lite0: EfficientNetLite0Encoder) -> None:
    assert imagenet_top1_on_photos_dev(lite0.classify) >= 0.65


def test_position_mapping_renames_and_checks_shapes() -> None:
    source = {"_conv.weight": torch.ones(4, 3), "_bn.bias": torch.zeros(4)}
    target = {"conv.weight": torch.empty(4, 3), "bn.bias": torch.empty(4)}
    mapped = map_state_dict_by_position(source, target)
    assert list(mapped) == ["conv.weight", "bn.bias"]
    assert mapped["conv.weight"] is source["_conv.weight"]
    with pytest.raises(ValueError, match=r"entry 1 is '_bn.bias' \(4,\).*'bn.bias' \(5,\)"):
        map_state_dict_by_position(source, {**target, "bn.bias": torch.empty(5)})
    with pytest.raises(ValueError, match="2 tensors in the checkpoint, 1 in the model"):
        map_state_dict_by_position(source, {"conv.weight": torch.empty(4, 3)})


def test_mismatched_weights_file_is_refused(tmp_path: Path) -> None:
    state = torch.load(packaged_weights_path(), weights_only=True)
    state["_fc.weight"] = state["_fc.weight"][:10]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    encoder = EfficientNetLite0Encoder(device=torch.device("cpu"), weights_path=broken)
    with pytest.raises(ValueError, match=r"_fc\.weight"):
        encoder.load()
    assert not encoder.loaded


# --- open_clip --------------------------------------------------------------------------------

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A tiny open_clip architecture registered for this test only; yields its name."""
    import open_clip
    import open_clip.factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # add_model_config has no inverse: restore open_clip's registry after the test.
    monkeypatch.setattr(
        open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS)
    )
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    config_file = tmp_path / f"{TINY_ARCH}.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_file)
    yield TINY_ARCH


def test_open_clip_local_checkpoint_matches_in_memory_model(
    tiny_clip: str, tmp_path: Path, photos: list[Image.Image]
) -> None:
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    model.eval()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)

    encoder = create_encoder(f"open_clip/{tiny_clip}/{checkpoint}", device="cpu")
    assert encoder.name == f"open_clip/{tiny_clip}/{checkpoint}"
    assert encoder.dim == 32 and encoder.has_text_tower and not encoder.loaded

    vectors = encoder.encode(photos, batch_size=2)
    prompts = ["a photo of a cat", "a cup of coffee"]
    texts = encoder.encode_text(prompts)
    with torch.inference_mode():
        image_ref = model.encode_image(torch.stack([preprocess(p) for p in photos]))
        text_ref = model.encode_text(open_clip.get_tokenizer(tiny_clip)(prompts))
    expected_images = torch.nn.functional.normalize(image_ref, dim=1).numpy()
    expected_texts = torch.nn.functional.normalize(text_ref, dim=1).numpy()

    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected_images, atol=1e-5)
    assert texts.shape == (2, 32) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts, expected_texts, atol=1e-5)
    assert encoder.encode_text([]).shape == (0, 32)

    encoder_id = encoder.id
    assert encoder_id.weights_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert encoder_id.preprocessing.startswith("size=32x32,")
    assert EncoderId.parse(str(encoder_id)) == encoder_id


def test_open_clip_missing_checkpoint_is_a_clear_error(tiny_clip: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tiny.pt"
    with pytest.raises(FileNotFoundError, match=r"checkpoint .* not found: .*nowhere/tiny\.pt"):
        create_encoder(f"open_clip/{tiny_clip}/{missing}", device="cpu")


def test_open_clip_unknown_tag_or_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        create_encoder("open_clip/ViT-B-32/no_such_tag", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        create_encoder("open_clip/No-Such-Arch/laion2b_s34b_b79k", device="cpu")


def test_open_clip_pretrained_tag_is_resolved_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = create_encoder("open_clip/ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert encoder.dim == 512 and encoder.has_text_tower
    assert not encoder.loaded  # creating it downloads nothing


def test_state_dict_digest_follows_content() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    before = state_dict_sha256(layer.state_dict())
    assert state_dict_sha256(dict(reversed(layer.state_dict().items()))) == before
    with torch.no_grad():
        layer.bias[0] += 1e-3
    assert state_dict_sha256(layer.state_dict()) != before
