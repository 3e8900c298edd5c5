"""Screen files in-process over a :class:`~moderation.service.runtime.Runtime`.

Thin entry points (CLI commands, Celery tasks, console views) call these.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from moderation.matching.decision import ScreeningResult
from moderation.matching.preparing import Prepared
from moderation.matching.recording import record_results
from moderation.media.video_formats import SNIFF_BYTES, sniff_video
from moderation.service.subjects import pseudonymize
from moderation.service.uploads import create_uploads
from moderation.storage.db import transaction

if TYPE_CHECKING:
    from moderation.matching.screening import Screener
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

#: Files per pipeline chunk of :func:`screen_paths`: small enough that the first chunks are
#: ready while the model loads and the last one's embedding leaves the other core idle only
#: briefly, large enough that storing (one transaction per chunk) stays cheap.
PIPELINE_CHUNK: Final = 16
#: Chunks prepared ahead of the one being embedded, each on its own thread, so both cores stay
#: busy whichever stage is the slower one on the machine.
PREPARE_AHEAD: Final = 2


def _read_files(paths: Sequence[Path], runtime: Runtime) -> list[bytes | None]:
    """Each file's bytes, or None when it is over its byte limit (a video's, by its magic
    bytes, else an image's: :attr:`Runtime.video_limits`, :attr:`Runtime.limits`) or cannot
    be read. Over the limit, no more than the first bytes are read."""
    datas: list[bytes | None] = []
    for path in paths:
        try:
            size = path.stat().st_size
            with path.open("rb") as file:
                head = file.read(SNIFF_BYTES)
                video = sniff_video(head) is not None
                limits = runtime.video_limits if video else runtime.limits
                datas.append(head + file.read() if size <= limits.max_bytes else None)
        except OSError as exc:
            logger.warning("cannot read %s: %s", path, exc)
            datas.append(None)
    return datas


def screen_paths(
    runtime: Runtime,
    paths: Sequence[Path],
    *,
    subject_id: str | None = None,
    external_id_prefix: str = "",
    on_result: Callable[[dict[str, Any]], None],
    actor: str = "cli",
    screener: Screener | None = None,
) -> list[ScreeningResult]:
    """Screen image files in batches, store each as an upload with its result.

    ``on_result`` gets, per input in order, ``path``, the CLI contract object
    (:meth:`ScreeningResult.to_json`) and ``upload_id``; ``screener`` defaults to
    :meth:`Runtime.screener`. Files over the byte limit end ``unscannable`` (``too_large``).

    Files go in chunks of :data:`PIPELINE_CHUNK`, in three overlapping stages: reading,
    decoding, PDQ and preprocessing of the next :data:`PREPARE_AHEAD` chunks (a thread each;
    the first ones while the model and the blocklist load); embedding, search and decision of
    chunk k; storing chunk k-1 and ``on_result`` (a thread; fsync waits). Results keep the
    input order.

    Raises:
        moderation.banks.snapshot.SnapshotError: the blocklist cannot be decrypted or
            verified; nothing is screened (fail closed).
    """
    chunks = [
        paths[start : start + PIPELINE_CHUNK] for start in range(0, len(paths), PIPELINE_CHUNK)
    ]
    results: list[ScreeningResult] = []
    preparer = runtime.preparer()

    def prepare(chunk: Sequence[Path]) -> tuple[list[bytes | None], Prepared]:
        datas = _read_files(chunk, runtime)
        return datas, preparer.prepare([d for d in datas if d is not None])

    def store(
        screener: Screener, chunk: Sequence[Path], datas: list[bytes | None], screened: Any
    ) -> None:
        chunk_results = [
            next(screened)
            if data is not None
            else screener.screen_unscannable("too_large", "file over the byte limit")
            for data in datas
        ]
        ids = _record(runtime, chunk, datas, chunk_results, subject_id, external_id_prefix, actor)
        for path, upload_id, result in zip(chunk, ids, chunk_results, strict=True):
            on_result({"path": str(path), **result.to_json(), "upload_id": upload_id})
        results.extend(chunk_results)

    _overlapped(chunks, prepare, (lambda: screener) if screener else runtime.screener, store)
    return results


def _overlapped(
    chunks: Sequence[Sequence[Path]],
    prepare: Callable[[Sequence[Path]], tuple[list[bytes | None], Prepared]],
    load_screener: Callable[[], Screener],
    store: Callable[[Screener, Sequence[Path], list[bytes | None], Any], None],
) -> None:
    """``prepare`` :data:`PREPARE_AHEAD` chunks ahead (the first ones while ``load_screener``
    runs), the screener's ``finish`` here, ``store`` on a thread; both in chunk order."""
    pool = ThreadPoolExecutor(max_workers=PREPARE_AHEAD + 1, thread_name_prefix="screen")
    try:
        ahead = deque(pool.submit(prepare, chunk) for chunk in chunks[:PREPARE_AHEAD])
        screener = load_screener()
        stored: Future[None] | None = None
        for index, chunk in enumerate(chunks):
            datas, ready = ahead.popleft().result()
            if index + PREPARE_AHEAD < len(chunks):
                ahead.append(pool.submit(prepare, chunks[index + PREPARE_AHEAD]))
            screened = iter(screener.finish(ready))
            if stored is not None:
                stored.result()  # in order, and its errors surface here
            stored = pool.submit(store, screener, chunk, datas, screened)
        if stored is not None:
            stored.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
