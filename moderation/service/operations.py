"""Screen files in-process over a :class:`~moderation.service.runtime.Runtime`.

Thin entry points (CLI commands, Celery tasks, console views) call these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moderation.matching.decision import ScreeningResult
from moderation.matching.recording import record_results
from moderation.service.preparation import Preparation, ReadyChunk, preparation
from moderation.service.subjects import pseudonymize
from moderation.service.uploads import create_uploads
from moderation.storage.db import transaction

if TYPE_CHECKING:
    from moderation.matching.screening import Screener
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

#: A chunk after embedding, search and decision: its files' bytes (None: over the byte limit),
#: the screener, and the results of the files that were screened.
Finished = tuple[list[bytes | None], "Screener", list[ScreeningResult]]


def _usable_preparation(
    runtime: Runtime, paths: Sequence[Path], prepared: Preparation | None
) -> Preparation:
    """``prepared`` when it prepares ``paths`` with the runtime's serving encoder, else a new
    preparation (``prepared`` closed)."""
    if prepared is not None and (
        prepared.preparer.encoder is not runtime.encoder or prepared.paths != tuple(paths)
    ):
        prepared.pipeline.close()
        prepared = None
    return prepared if prepared is not None else preparation(paths, runtime.preparer())


def screen_paths(
    runtime: Runtime,
    paths: Sequence[Path],
    *,
    subject_id: str | None = None,
    external_id_prefix: str = "",
    on_result: Callable[[dict[str, Any]], None],
    actor: str = "cli",
    screener: Screener | None = None,
    prepared: Preparation | None = None,
) -> list[ScreeningResult]:
    """Screen image files in batches, store each as an upload with its result.

    ``on_result`` gets, per input in order, ``path``, the CLI contract object
    (:meth:`ScreeningResult.to_json`) and ``upload_id``; ``screener`` defaults to
    :meth:`Runtime.screener`. Files over the byte limit end ``unscannable`` (``too_large``).

    Files go in chunks of :data:`~moderation.service.preparation.PIPELINE_CHUNK` through three
    stages (:class:`~moderation.service.pipeline.Pipeline`): reading, decoding, PDQ and
    preprocessing (the first chunks while the model and the blocklist load); embedding, search
    and decision; storing and ``on_result`` (this thread, in input order). A worker thread per
    core takes whichever of the first two is ready; as many chunks are embedded at once as the
    encoder runs well side by side (:attr:`~moderation.signals.encoders.Encoder.concurrent_calls`).
    ``prepared``: the same ``paths`` already being prepared
    (:func:`~moderation.service.preparation.early_preparation`); used when its encoder is the
    runtime's serving one, else closed; closed when this returns (the caller closes it if
    this raises).

    Raises:
        moderation.banks.snapshot.SnapshotError: the blocklist cannot be decrypted or
            verified; nothing is screened (fail closed).
    """
    results: list[ScreeningResult] = []
    prepared = _usable_preparation(runtime, paths, prepared)

    def finish(loaded: Screener, ready: ReadyChunk) -> Finished:
        return ready[0], loaded, loaded.finish(ready[1])

    def store(chunk: Sequence[Path], done: Finished) -> None:
        datas, loaded, screened = done
        finished = iter(screened)
        chunk_results = [
            next(finished)
            if data is not None
            else loaded.screen_unscannable("too_large", "file over the byte limit")
            for data in datas
        ]
        ids = _record(runtime, chunk, datas, chunk_results, subject_id, external_id_prefix, actor)
        for path, upload_id, result in zip(chunk, ids, chunk_results, strict=True):
            on_result({"path": str(path), **result.to_json(), "upload_id": upload_id})
        results.extend(chunk_results)

    load = (lambda: screener) if screener else runtime.screener
    prepared.pipeline.run(load, finish, store)
    return results


def _record(
    runtime: Runtime,
    chunk: Sequence[Path],
    datas: list[bytes | None],
    chunk_results: list[ScreeningResult],
    subject_id: str | None,
    external_id_prefix: str,
    actor: str,
) -> list[Any]:
    """Store one batch's uploads and results; their upload ids, in order."""
    settings = runtime.settings
    with transaction(runtime.sessions) as session:
        subject_ref = pseudonymize(session, runtime.keyring, subject_id) if subject_id else None
        uploads = create_uploads(
            session,
            [
                (data, f"{external_id_prefix}{path}")
                for path, data in zip(chunk, datas, strict=True)
            ],
            keyring=runtime.keyring,
            blobs_dir=settings.blobs_dir,
            subject_ref=subject_ref,
            source="cli",
            status="processing",
        )
        record_results(session, list(zip(uploads, chunk_results, strict=True)), actor=actor)
    return [upload.id for upload in uploads]
