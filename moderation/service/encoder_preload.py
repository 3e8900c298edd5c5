"""The configured encoder, and loading it on a second thread while a command starts.

A one-off command (``moderation screen``) spends its first half second importing SQLAlchemy,
the library and its settings on one core, holding the GIL. Loading the ONNX model meanwhile
(OpenVINO's compile or its cached blob, ONNX Runtime's session, the probe batch) is native
code that runs without the GIL, so on a second core it is free in wall-clock terms.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moderation.config import Settings
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)


def configured_encoder(settings: Settings, name: str | None = None) -> Encoder:
    """The encoder called ``name`` (default ``settings.encoder``) with the settings' device,
    runtime, cache, threads and inference precision; ``encoder_precision`` and
    ``encoder_calibration_dir`` apply to the configured encoder only (another one runs at
    fp32). The same object for the same
    arguments within a process (:func:`~moderation.signals.encoders.create_encoder`).

    Raises:
        ValueError, FileNotFoundError: as :func:`~moderation.signals.encoders.create_encoder`.
    """
    from moderation.signals.encoders import create_encoder

    name = name or settings.encoder
    configured = name == settings.encoder
    return create_encoder(
        name,
        device=settings.device,
        runtime=settings.encoder_runtime,
        cache_dir=settings.resolved_data_dir / "cache",
        threads=settings.torch_threads,
        precision=settings.encoder_precision if configured else "fp32",
        calibration_dir=settings.encoder_calibration_dir if configured else None,
        inference_precision=settings.inference_precision,
    )


def preload_encoder(settings: Settings) -> threading.Thread | None:
    """Start loading the configured encoder on a daemon thread, when it runs without torch
    (importing torch on a second thread would only contend with the main one); returns the
    thread, or None when nothing was started.

    The runtime later asks :func:`configured_encoder` for the same object, whose ``load``
    waits for this one (its lock) and returns its model. A serving encoder other than the
    configured one (a promoted encoder migration) is simply loaded then. A failure here is
    logged and left to that later load, which raises it in its own context.
    """
    try:
        encoder = configured_encoder(settings)
    except (ValueError, FileNotFoundError, OSError) as exc:
        logger.debug("encoder not preloaded: %s", exc)
        return None
    if encoder.uses_torch or encoder.loaded:
        return None

    def load() -> None:
        try:
            encoder.load()
        except Exception as exc:  # raised again by the runtime's own load
            logger.debug("encoder preload failed: %s", exc)

    thread = threading.Thread(target=load, name="encoder-preload", daemon=True)
    thread.start()
    return thread
