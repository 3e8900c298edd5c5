"""Choosing the torch device an encoder runs on.

The CUDA branches are written for production GPUs but have never run on a GPU: the development
machines and CI have none, so they are tested only with ``torch.cuda.is_available`` patched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine (e.g. ``cuda`` without CUDA)."""


@dataclass(frozen=True)
class HostCpu:
    """The CPU as the ONNX Runtime encoder's device: ``type`` and ``str()`` as
    ``torch.device("cpu")``, without importing torch."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


#: Files present whenever an NVIDIA driver is loaded (``/proc/driver/nvidia`` is the driver's
#: procfs directory; ``/dev/nvidiactl`` its control node). Without them CUDA cannot be available.
NVIDIA_DRIVER_MARKERS = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


def cpu_only(preference: str) -> bool:
    """Whether ``preference`` certainly means the CPU, decided without importing torch:
    ``"cpu"``, or ``"auto"`` on a machine without an NVIDIA driver. Anything else is left to
    :func:`select_device`."""
    text = preference.strip().lower()
    if text == "cpu":
        return True
    return text == "auto" and not any(marker.exists() for marker in NVIDIA_DRIVER_MARKERS)


def select_device(preference: str = "auto") -> torch.device:
    """The torch device for ``preference``.

    ``"auto"`` gives CUDA when ``torch.cuda.is_available()`` and the CPU otherwise; ``"cpu"``,
    ``"cuda"`` and ``"cuda:N"`` are explicit. Encoders run in float16 on CUDA and float32 on the
    CPU (see :attr:`moderation.signals.encoders.Encoder.dtype`).

    Raises:
        DeviceUnavailableError: ``"cuda"`` or ``"cuda:N"`` was asked for and CUDA is absent, or N
            is not below ``torch.cuda.device_count()``.
        ValueError: ``preference`` is none of the forms above.
    """
    import torch

    text = preference.strip().lower()
    if text == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.debug("device auto -> %s", device)
        return device
    if text == "cpu":
        return torch.device("cpu")
    index_match = _CUDA_INDEX.fullmatch(text)
    if text == "cuda" or index_match:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {preference!r} was requested but CUDA is not available "
                "(no GPU, or torch was built without CUDA); use 'auto' or 'cpu'"
            )
        if index_match is None:
            return torch.device("cuda")
        index = int(index_match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailableError(
                f"device {preference!r} was requested but only {count} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {preference!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
