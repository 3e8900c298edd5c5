"""The encoder interface: images (and, for CLIP-style models, text) to unit-length embeddings.

Backends implement model construction, per-image preprocessing and one raw forward pass; this
module owns everything they share: lazy thread-safe loading, ``eval()`` and
``torch.inference_mode()``, batching, moving batches to the device (float16 on CUDA), and the one
place where embeddings are L2-normalised (the role of ``normalize=True`` in open_clip's
``model.py`` ``encode_image``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# "|" cannot occur in a digest or in a preprocessing description (both are checked), so the last
# two separators of the canonical string are unambiguous whatever the name contains.
_SEPARATOR = "|"
_DIGEST_PREFIX = "sha256="


@dataclass(frozen=True)
class EncoderId:
    """What an embedding depends on: model name, the exact weights, and the preprocessing.

    Recorded with every index snapshot; a worker whose encoder id differs from a snapshot's
    refuses that snapshot, because embeddings from different weights or preprocessing are not
    comparable by cosine similarity.

    Attributes:
        name: the encoder name given to ``create_encoder``, e.g. ``"timm/efficientnet_lite0"``.
        weights_sha256: 64 lowercase hex digits identifying the weights actually loaded.
        preprocessing: canonical description of resize, crop, interpolation, normalisation and
            pooling, e.g. ``"resize=224x224,interp=bicubic,mean=...,std=...,pool=gem3"``.

    Raises:
        ValueError: on construction, when ``name`` is empty or has a line break, the digest is
            not 64 lowercase hex digits, or ``preprocessing`` is empty or contains ``"|"``.
    """

    name: str
    weights_sha256: str
    preprocessing: str

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "\r\n"):
            raise ValueError(f"encoder name must be non-empty and on one line: {self.name!r}")
        if not _SHA256_HEX.fullmatch(self.weights_sha256):
            raise ValueError(
                f"weights_sha256 must be 64 lowercase hex digits: {self.weights_sha256!r}"
            )
        if not self.preprocessing or _SEPARATOR in self.preprocessing:
            raise ValueError(
                f"preprocessing must be non-empty without {_SEPARATOR!r}: {self.preprocessing!r}"
            )
        if any(c in self.preprocessing for c in "\r\n"):
            raise ValueError(f"preprocessing must be on one line: {self.preprocessing!r}")

    def __str__(self) -> str:
        """``<name>|sha256=<hex>|<preprocessing>``, the form stored with index snapshots."""
        return _SEPARATOR.join(
            (self.name, _DIGEST_PREFIX + self.weights_sha256, self.preprocessing)
        )

    @classmethod
    def parse(cls, text: str) -> EncoderId:
        """The inverse of ``str()``.

        Raises:
            ValueError: ``text`` is not of the form ``<name>|sha256=<hex>|<preprocessing>``.
        """
        parts = text.rsplit(_SEPARATOR, 2)
        if len(parts) != 3 or not parts[1].startswith(_DIGEST_PREFIX):
            raise ValueError(
                f"not an encoder id (expected '<name>|sha256=<hex>|<preprocessing>'): {text!r}"
            )
        name, digest, preprocessing = parts
        return cls(name, digest.removeprefix(_DIGEST_PREFIX), preprocessing)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in ``chunk_bytes`` pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict's content, independent of how it was serialised.

    Hashes, for each entry in sorted key order: the key, dtype, shape and the tensor's bytes
    (contiguous, on the CPU, in its own dtype). Used where no single weights file identifies a
    model, e.g. open_clip pretrained tags resolved through a download cache.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def l2_normalise(features: torch.Tensor) -> npt.NDArray[np.float32]:
    """Rows of ``features`` (n, d) scaled to unit L2 norm, as a float32 numpy array (n, d).

    The only normalisation in the encoders. Computed in float32 so float16 CUDA outputs cannot
    overflow when squared.
    """
    rows = features.detach().to("cpu", torch.float32)
    normalised = torch.nn.functional.normalize(rows, p=2.0, dim=1, eps=1e-12)
    return np.ascontiguousarray(normalised.numpy(), dtype=np.float32)


def check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` as a list after checking each is a non-empty RGB PIL image.

    Raises:
        TypeError: ``images`` is a single image, or holds something other than PIL images.
        ValueError: an image's mode is not ``"RGB"``, or it has no pixels.
    """
    if isinstance(images, Image.Image):
        raise TypeError("encode() takes a sequence of images; wrap a single image in a list")
    checked = list(images)
    for position, image in enumerate(checked):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {position} is {type(image).__name__}, not a PIL image")
        if image.mode != "RGB":
            raise ValueError(
                f"image {position} has mode {image.mode!r}; encoders take RGB images "
                "(decode and convert them before embedding)"
            )
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image {position} is empty ({image.width}x{image.height} px)")
    return checked


class Encoder(ABC):
    """Maps RGB images to unit-length embeddings compared by cosine similarity.

    Obtain encoders from :func:`moderation.signals.encoders.create_encoder`, which caches one per
    (name, device). The model is built on first use (:meth:`load`, :meth:`encode`,
    :meth:`encode_text` or, for some backends, :attr:`id`), never at construction or import, and
    runs under ``eval()`` and ``torch.inference_mode()``, in float16 on CUDA and float32 on the
    CPU. The CUDA path (``half()``, pinned host memory, non-blocking copies) has never run on a
    GPU: the project's machines have none.

    Attributes:
        name: the name given to ``create_encoder``.
        dim: embedding dimension d.
        device: where the model runs.
        has_text_tower: whether :meth:`encode_text` is supported.
    """

    name: str
    dim: int
    device: torch.device
    has_text_tower: bool = False

    def __init__(self, *, name: str, dim: int, device: torch.device) -> None:
        self.name = name
        self.dim = dim
        self.device = device
        self._model: torch.nn.Module | None = None
        self._id: EncoderId | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"

    @property
    def loaded(self) -> bool:
        """Whether the model has been built and its weights loaded."""
        return self._model is not None

    @property
    def dtype(self) -> torch.dtype:
        """float16 on CUDA, float32 elsewhere."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    @property
    def id(self) -> EncoderId:
        """The :class:`EncoderId` of this encoder; may load or hash the weights on first access."""
        if self._id is None:
            with self._lock:
                if self._id is None:
                    self._id = EncoderId(self.name, self._weights_sha256(), self.preprocessing)
        return self._id

    @property
    @abstractmethod
    def preprocessing(self) -> str:
        """Canonical description of the preprocessing (and pooling), as in :class:`EncoderId`."""

    def load(self) -> torch.nn.Module:
        """Build the model and load its weights once (thread-safe); later calls return it.

        Raises:
            whatever the backend raises for missing or mismatched weights (``FileNotFoundError``,
            ``ValueError``, ``RuntimeError``).
        """
        model = self._model
        if model is not None:
            return model
        with self._lock:
            if self._model is None:
                logger.info("loading encoder %s on %s", self.name, self.device)
                built = self._build_model()
                built.eval()
                built.requires_grad_(False)
                built.to(self.device)
                if self.dtype == torch.float16:
                    built.half()
                self._prepare_runtime(built)
                self._model = built
            return self._model

    def _prepare_runtime(self, model: torch.nn.Module) -> None:
        """Set up a faster forward path for the loaded ``model`` (default: none).

        Called once, under the load lock, after the model is in eval mode on its device and
        dtype. Backends override it to convert memory layout or build an inference session
        (see :mod:`.timm_backend`); the embeddings must stay those of the eager model.
        """
        logger.debug("%s runs its model as built (%s)", self.name, type(model).__name__)

    def encode(
        self, images: Sequence[Image.Image], batch_size: int = 32
    ) -> npt.NDArray[np.float32]:
        """Embeddings of ``images``: float32 array (n, dim), every row of unit L2 norm.

        Images are RGB PIL images of any size; the encoder applies its own preprocessing. An
        empty sequence gives an array of shape (0, dim).

        Raises:
            TypeError: ``images`` is a single image or holds something other than PIL images.
            ValueError: an image is not in mode ``"RGB"`` or is empty; ``batch_size`` < 1.
        """
        checked = check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not checked:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load()
        features = self._run_batches(checked, batch_size, self._preprocess, self._forward)
        if features.shape != (len(checked), self.dim):
            raise RuntimeError(
                f"{self.name} returned features of shape {tuple(features.shape)}, "
                f"expected {(len(checked), self.dim)}"
            )
        return l2_normalise(features)

    def encode_text(self, prompts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Text embeddings in the image embedding space: float32 array (n, dim), unit rows.

        Raises:
            NotImplementedError: the encoder has no text tower (``has_text_tower`` is False).
            TypeError: ``prompts`` is a single string.
        """
        if not self.has_text_tower:
            raise NotImplementedError(
                f"encoder {self.name!r} has no text tower; text prompts need an open_clip "
                "encoder (open_clip/<arch>/<pretrained>)"
            )
        if isinstance(prompts, str):
            raise TypeError("encode_text() takes a sequence of prompts; wrap one in a list")
        texts = list(prompts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load()
        with torch.inference_mode():
            features = self._forward_text(texts)
        return l2_normalise(features)

    def _run_batches(
        self,
        images: list[Image.Image],
        batch_size: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``forward`` over preprocessed batches of ``images``, concatenated in float32 on CPU."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        outputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.stack(
                    [preprocess(image) for image in images[start : start + batch_size]]
                )
                outputs.append(forward(self._to_device(batch)).to("cpu", torch.float32))
        return torch.cat(outputs)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU float32 batch on the model's device and dtype (pinned, non-blocking on CUDA)."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.dtype)

    @abstractmethod
    def _build_model(self) -> torch.nn.Module:
        """A new model with its weights loaded (on the CPU; :meth:`load` moves and casts it)."""

    @abstractmethod
    def _weights_sha256(self) -> str:
        """Hex SHA-256 identifying the weights (see :class:`EncoderId`)."""

    @abstractmethod
    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to a float32 tensor (3, H, W) ready for :meth:`_forward`."""

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image features (n, dim) of a device batch (n, 3, H, W).

        The single forward path, so an optimised one (channels_last, ONNX) can replace it.
        """

    def _forward_text(self, prompts: list[str]) -> torch.Tensor:
        """Raw text features (n, dim); only backends with a text tower override this."""
        raise NotImplementedError(f"encoder {self.name!r} has no text tower")
