"""The encoder interface: images (and, for CLIP-style models, text) to unit-length embeddings.

This module imports no torch: the ONNX Runtime encoder (:mod:`.lite0_onnx`) serves without it.
It owns what every backend shares: the encoder id, input checks, lazy thread-safe loading,
and the one place where embeddings are L2-normalised (the role of ``normalize=True`` in
open_clip's ``model.py`` ``encode_image``). The PyTorch backends' common code (``eval()``,
``torch.inference_mode()``, batching, float16 on CUDA) is :mod:`.torch_base`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    import torch

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
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def l2_normalise(features: npt.ArrayLike | torch.Tensor) -> npt.NDArray[np.float32]:
    """Rows of ``features`` (n, d), a numpy array or a torch tensor on any device, scaled to unit
    L2 norm, as a float32 numpy array (n, d).

    The only normalisation in the encoders (``x / max(||x||, 1e-12)``, as
    ``torch.nn.functional.normalize``). Computed in float32 so float16 CUDA outputs cannot
    overflow when squared.
    """
    if hasattr(features, "detach"):  # a torch tensor; torch itself is not imported here
        features = features.detach().float().cpu().numpy()
    rows = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.ascontiguousarray(rows / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


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


class DeviceLike(Protocol):
    """What the library reads of an encoder's device: ``torch.device`` or :class:`HostCpu`."""

    @property
    def type(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        ...


class Encoder(ABC):
    """Maps RGB images to unit-length embeddings compared by cosine similarity.

    Obtain encoders from :func:`moderation.signals.encoders.create_encoder`, which caches one per
    (name, device). The model is built on first use (:meth:`load`, :meth:`encode`,
    :meth:`encode_text` or, for some backends, :attr:`id`), never at construction or import.

    Attributes:
        name: the name given to ``create_encoder``.
        dim: embedding dimension d.
        device: where the model runs (``torch.device``, or :class:`HostCpu` for ONNX Runtime).
        has_text_tower: whether :meth:`encode_text` is supported.
        has_feature_windows: whether :meth:`encode_inputs_with_windows` is supported.
        uses_torch: whether the model runs in PyTorch (so torch's thread settings apply).
    """

    name: str
    dim: int
    device: DeviceLike
    has_text_tower: bool = False
    uses_torch: bool = False
    #: Whether :meth:`encode_inputs_with_windows` works (the model exposes its last feature map).
    has_feature_windows: bool = False

    def __init__(self, *, name: str, dim: int, device: DeviceLike) -> None:
        self.name = name
        self.dim = dim
        self.device = device
        self._model: Any = None
        self._id: EncoderId | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"

    @property
    def concurrent_calls(self) -> int:
        """How many :meth:`encode_inputs` calls run well side by side, each on its own thread
        (a pipeline embeds that many batches at once): 1 here, for models that spread one call
        over several threads or a device."""
        return 1

    @property
    def loaded(self) -> bool:
        """Whether the model has been built and its weights loaded."""
        return self._model is not None

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

    def load(self) -> Any:
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
                self._model = self._load_model()
            return self._model

    def encode(
        self, images: Sequence[Image.Image], batch_size: int = 32
    ) -> npt.NDArray[np.float32]:
        """Embeddings of ``images``: float32 array (n, dim), every row of unit L2 norm.

        Images are RGB PIL images of any size; the encoder applies its own preprocessing. An
        empty sequence gives an array of shape (0, dim). The same as
        ``encode_inputs(preprocess(images), batch_size)``.

        Raises:
            TypeError: ``images`` is a single image or holds something other than PIL images.
            ValueError: an image is not in mode ``"RGB"`` or is empty; ``batch_size`` < 1.
        """
        return self.encode_inputs(self.preprocess(images), batch_size)

    def preprocess(self, images: Sequence[Image.Image]) -> list[Any]:
        """Per-image encoder inputs of ``images`` for :meth:`encode_inputs`, one per image.

        Needs no model and is thread-safe, so a pipeline can prepare the next batch while the
        current one runs (:class:`moderation.matching.screening.Screener`). By default the
        checked images themselves; the ONNX encoder returns its resized, normalised pixels.

        Raises:
            TypeError, ValueError: as :meth:`encode`.
        """
        return check_images(images)

    def encode_inputs(self, inputs: Sequence[Any], batch_size: int = 32) -> npt.NDArray[np.float32]:
        """Embeddings (n, dim) float32, unit rows, of inputs from :meth:`preprocess`.

        Raises:
            ValueError: ``batch_size`` < 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        items = list(inputs)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load()
        features = self._embed(items, batch_size)
        if tuple(features.shape) != (len(items), self.dim):
            raise RuntimeError(
                f"{self.name} returned features of shape {tuple(features.shape)}, "
                f"expected {(len(items), self.dim)}"
            )
        return l2_normalise(features)

    def encode_paste_descriptors(
        self, images: Sequence[Image.Image], batch_size: int = 32
    ) -> npt.NDArray[np.float32]:
        """Each image's paste descriptor, float32 (n, dim) unit rows: the
        :data:`.feature_windows.PASTE_CELLS` window of its :func:`.feature_windows.paste_canvas`
        (one model pass per image).

        Raises:
            NotImplementedError, TypeError, ValueError: as :meth:`encode_inputs_with_windows`
                and :meth:`encode`.
        """
        from moderation.signals.encoders.feature_windows import PASTE_CELLS, paste_canvas

        canvases = [paste_canvas(image) for image in check_images(images)]
        _, windows = self.encode_inputs_with_windows(
            self.preprocess(canvases), batch_size, cells=PASTE_CELLS
        )
        return np.ascontiguousarray(windows[:, 0])

    def encode_inputs_with_windows(
        self,
        inputs: Sequence[Any],
        batch_size: int = 32,
        *,
        cells: tuple[tuple[int, int, int], ...] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """:meth:`encode_inputs`' embeddings (n, dim) and, from the same model pass, the
        feature-map window descriptors float32 (n, w, dim), unit rows
        (:func:`.feature_windows.pool_windows` over ``cells``, by default
        :data:`.feature_windows.WINDOW_CELLS`).

        Raises:
            NotImplementedError: the encoder has no feature windows (``has_feature_windows``).
            ValueError: ``batch_size`` < 1.
        """
        from moderation.signals.encoders.feature_windows import WINDOW_CELLS, pool_windows

        cells = WINDOW_CELLS if cells is None else cells
        if not self.has_feature_windows:
            raise NotImplementedError(f"encoder {self.name!r} has no feature-map windows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        items = list(inputs)
        if not items:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, np.zeros((0, len(cells), self.dim), dtype=np.float32)
        self.load()
        features, maps = self._embed_maps(items, batch_size)
        if tuple(features.shape) != (len(items), self.dim) or len(maps) != len(items):
            raise RuntimeError(
                f"{self.name} returned features {tuple(features.shape)} and maps "
                f"{tuple(maps.shape)} for {len(items)} inputs"
            )
        return l2_normalise(features), pool_windows(maps, cells)

    def _embed_maps(self, inputs: list[Any], batch_size: int) -> tuple[Any, Any]:
        """Raw features (n, dim) and last feature maps (n, dim, h, w), numpy, of
        :meth:`preprocess` outputs; only encoders with ``has_feature_windows`` override this."""
        raise NotImplementedError(f"encoder {self.name!r} has no feature-map windows")

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
        return l2_normalise(self._embed_text(texts))

    @abstractmethod
    def _load_model(self) -> Any:
        """The ready-to-run model (called once, under the load lock)."""

    @abstractmethod
    def _weights_sha256(self) -> str:
        """Hex SHA-256 identifying the weights (see :class:`EncoderId`)."""

    @abstractmethod
    def _embed(self, inputs: list[Any], batch_size: int) -> Any:
        """Raw (unnormalised) features (n, dim) of :meth:`preprocess` outputs, in batches of
        ``batch_size``: a numpy array or a torch tensor."""

    def _embed_text(self, prompts: list[str]) -> Any:
        """Raw text features (n, dim); only backends with a text tower override this."""
        raise NotImplementedError(f"encoder {self.name!r} has no text tower")
