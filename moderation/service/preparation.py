"""The first stage of screening files: reading, decoding, hashing and preprocessing them in
chunks on worker threads (:class:`~moderation.service.pipeline.Pipeline`), which may start
before the rest of screening is imported or set up.

``moderation screen`` starts it as soon as its settings are read (:func:`preparation`), so the
second core decodes while the first still imports the storage and search modules and opens the
database; :func:`moderation.service.operations.screen_paths` then finishes and stores what it
prepared. Needs no model, blocklist or database: only the encoder's preprocessing and the
decode limits (:class:`~moderation.matching.preparing.Preparer`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from moderation.media.video_formats import SNIFF_BYTES, sniff_video
from moderation.service.pipeline import Pipeline, usable_cores

if TYPE_CHECKING:
    from moderation.config import Settings
    from moderation.matching.preparing import Prepared, Preparer

logger = logging.getLogger(__name__)

#: Files per pipeline chunk: small enough that the first chunks are ready while the model
#: loads and the last one's embedding leaves the other core idle only briefly, large enough
#: that storing (one transaction per chunk) stays cheap.
PIPELINE_CHUNK: Final = 16

#: One chunk after preparation: each file's bytes (None: over its byte limit or unreadable) and
#: the prepared uploads of the others, in order.
ReadyChunk = tuple[list[bytes | None], "Prepared"]


def read_files(paths: Sequence[Path], preparer: Preparer) -> list[bytes | None]:
    """Each file's bytes, or None when it is over its byte limit (a video's, by its magic
    bytes, else an image's: ``preparer.video_limits``, ``preparer.limits``) or cannot be read.
    Over the limit, no more than the first bytes are read."""
    datas: list[bytes | None] = []
    for path in paths:
        try:
            size = path.stat().st_size
            with path.open("rb") as file:
                head = file.read(SNIFF_BYTES)
                video = sniff_video(head) is not None
                limits = preparer.video_limits if video else preparer.limits
                datas.append(head + file.read() if size <= limits.max_bytes else None)
        except OSError as exc:
            logger.warning("cannot read %s: %s", path, exc)
            datas.append(None)
    return datas


@dataclass(frozen=True)
class Preparation:
    """Files being prepared by ``preparer`` in chunks of :data:`PIPELINE_CHUNK` on
    ``pipeline``'s workers (call ``pipeline.close()`` unless it is run)."""

    paths: tuple[Path, ...]
    preparer: Preparer
    pipeline: Pipeline[Sequence[Path], ReadyChunk, Any, Any]


def preparation(paths: Sequence[Path], preparer: Preparer) -> Preparation:
    """A :class:`Preparation` of ``paths`` (not started): one worker per usable core (at least
    two), as many chunks embedded at once as ``preparer.encoder`` runs well side by side
    (:attr:`~moderation.signals.encoders.Encoder.concurrent_calls`). Prepared chunks are
    embedded as soon as the encoder has loaded (:meth:`Preparer.embed`), also while the
    screener (blocklist, database, classifier) is still loading."""
    chunks = [paths[i : i + PIPELINE_CHUNK] for i in range(0, len(paths), PIPELINE_CHUNK)]

    def prepare(chunk: Sequence[Path]) -> ReadyChunk:
        datas = read_files(chunk, preparer)
        return datas, preparer.prepare([d for d in datas if d is not None])

    def embed(ready: ReadyChunk) -> ReadyChunk:
        return ready[0], preparer.embed(ready[1])

    workers = max(2, usable_cores())
    concurrent = min(workers, preparer.encoder.concurrent_calls)
    pipeline: Pipeline[Sequence[Path], ReadyChunk, Any, Any] = Pipeline(
        chunks,
        prepare,
        workers=workers,
        concurrent=concurrent,
        advance=embed,
        can_advance=lambda: preparer.encoder.loaded,
    )
    return Preparation(tuple(paths), preparer, pipeline)


def early_preparation(settings: Settings, paths: Sequence[Path]) -> Preparation | None:
    """A started :class:`Preparation` of ``paths`` for the configured encoder (the one
    :func:`~moderation.service.encoder_preload.preload_encoder` loads) under ``settings``'
    limits, before any runtime exists; None when that encoder cannot be made (the runtime
    raises the error in its own context later). ``screen_paths`` uses it when that encoder
    serves, else closes it and prepares again (a promoted encoder migration).
    """
    from moderation.matching.preparing import Preparer
    from moderation.service.encoder_preload import configured_encoder

    try:
        encoder = configured_encoder(settings)
    except (ValueError, FileNotFoundError, OSError) as exc:
        logger.debug("no early preparation: %s", exc)
        return None
    prepared = preparation(paths, Preparer.from_settings(encoder, settings))
    prepared.pipeline.start()
    return prepared
