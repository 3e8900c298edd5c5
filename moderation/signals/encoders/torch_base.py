"""What the PyTorch encoders share: model set-up (``eval()``, no gradients, device and dtype),
``torch.inference_mode()``, batching, and moving batches to the device (float16 on CUDA).

Backends implement model construction, per-image preprocessing and one raw forward pass. Only
this module and the backends import torch; the ONNX Runtime encoder (:mod:`.lite0_onnx`) does
not.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable

import torch
from PIL import Image

from moderation.signals.encoders.base import Encoder

logger = logging.getLogger(__name__)


class TorchEncoder(Encoder):
    """An :class:`~.base.Encoder` whose model is a ``torch.nn.Module``, run under ``eval()``
    and ``torch.inference_mode()``, in float16 on CUDA and float32 on the CPU. The CUDA path
    (``half()``, pinned host memory, non-blocking copies) has never run on a GPU: the project's
    machines have none."""

    device: torch.device
    uses_torch = True

    def __init__(self, *, name: str, dim: int, device: torch.device) -> None:
        super().__init__(name=name, dim=dim, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """float16 on CUDA, float32 elsewhere."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def load(self) -> torch.nn.Module:
        """The built model (see :meth:`.base.Encoder.load`)."""
        model: torch.nn.Module = super().load()
        return model

    def _load_model(self) -> torch.nn.Module:
        built = self._build_model()
        built.eval()
        built.requires_grad_(False)
        built.to(self.device)
        if self.dtype == torch.float16:
            built.half()
        self._prepare_runtime(built)
        return built

    def _prepare_runtime(self, model: torch.nn.Module) -> None:
        """Set up a faster forward path for the loaded ``model`` (default: none).

        Called once, under the load lock, after the model is in eval mode on its device and
        dtype. Backends override it to convert memory layout or build an inference session
        (see :mod:`.timm_backend`); the embeddings must stay those of the eager model.
        """
        logger.debug("%s runs its model as built (%s)", self.name, type(model).__name__)

    def _embed(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        return self._run_batches(images, batch_size, self._preprocess, self._forward)

    def _embed_text(self, prompts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward_text(prompts)

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
