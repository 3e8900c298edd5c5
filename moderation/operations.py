"""Whole operations over a :class:`~moderation.runtime.Runtime`: screen files, rotate keys.

Thin entry points (CLI commands, Celery tasks, console views) call these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moderation.crypto import KeyRing
from moderation.keys import RotationReport, rewrap_all
from moderation.screening import ScreeningResult, record_result
from moderation.storage.db import transaction
from moderation.subjects import pseudonymize
from moderation.uploads import create_upload

if TYPE_CHECKING:
    from moderation.runtime import Runtime

logger = logging.getLogger(__name__)


def screen_paths(
    runtime: Runtime,
    paths: Sequence[Path],
    *,
    subject_id: str | None = None,
    external_id_prefix: str = "",
    on_result: Callable[[dict[str, Any]], None],
    actor: str = "cli",
) -> list[ScreeningResult]:
    """Screen image files in batches, store each as an upload with its result.

    ``on_result`` receives, per input and in order, the CLI contract object
    (``path``, ``decision``, ``policy``, ``score``, ``reason``, ``matches``, ``timings_ms``)
    plus ``upload_id``. Files over the byte limit are not read: they end ``unscannable`` with
    reason ``too_large``.

    Raises:
        moderation.blocklist.snapshot.SnapshotError: the blocklist cannot be decrypted or
            verified; nothing is screened (fail closed).
    """
    screener = runtime.screener()
    settings = runtime.settings
    batch = max(1, settings.batch_size)
    results: list[ScreeningResult] = []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        datas: list[bytes | None] = []
        for path in chunk:
            try:
                size = path.stat().st_size
                datas.append(path.read_bytes() if size <= runtime.limits.max_bytes else None)
            except OSError as exc:
                logger.warning("cannot read %s: %s", path, exc)
                datas.append(None)
        readable = [d for d in datas if d is not None]
        screened = iter(screener.screen_bytes(readable))
        chunk_results = [
            next(screened)
            if data is not None
            else screener.screen_unscannable("too_large", "file over the byte limit")
            for data in datas
        ]
        with transaction(runtime.sessions) as session:
            subject_ref = pseudonymize(session, runtime.keyring, subject_id) if subject_id else None
            uploads = []
            for path, data, result in zip(chunk, datas, chunk_results, strict=True):
                upload = create_upload(
                    session,
                    data,
                    keyring=runtime.keyring,
                    blobs_dir=settings.blobs_dir,
                    external_id=f"{external_id_prefix}{path}",
                    subject_ref=subject_ref,
                    source="cli",
                    status="processing",
                )
                record_result(session, upload, result, actor=actor)
                uploads.append(upload)
        for path, upload, result in zip(chunk, uploads, chunk_results, strict=True):
            on_result({"path": str(path), **result.to_json(), "upload_id": upload.id})
        results.extend(chunk_results)
    return results


def rotate_keys(runtime: Runtime, *, retire_old: bool, actor: str) -> RotationReport:
    """Rotate master keys (RELIABILITY.md E4) and re-wrap every stored data key.

    With a key file: generate a key, make it primary (saved before anything is re-wrapped, so a
    crash leaves every object readable), re-wrap all stores in one transaction, delete the
    superseded snapshot files, then (``retire_old``) drop the old keys from the file. With
    ``MODERATION_MASTER_KEYS``: re-wrap under the variable's first key; retiring is done by
    removing old keys from the variable afterwards.

    Raises:
        moderation.crypto.UnknownKeyError: something is wrapped under a key the ring lacks.
    """
    settings = runtime.settings
    snapshots_dir = settings.snapshots_dir
    if settings.master_keys is not None:
        ring = runtime.keyring
        with transaction(runtime.sessions) as session:
            report = rewrap_all(session, ring, snapshots_dir, actor=actor)
    else:
        path = settings.key_file_path
        old = KeyRing.load_file(path)
        ring = old.with_new_primary()
        ring.save_file(path)
        with transaction(runtime.sessions) as session:
            report = rewrap_all(session, ring, snapshots_dir, actor=actor)
        if retire_old:
            for key_id in old.key_ids:
                ring = ring.without(key_id)
            ring.save_file(path)
            report.retired = list(old.key_ids)
            with transaction(runtime.sessions) as session:
                from moderation.audit import record_event

                record_event(
                    session,
                    actor=actor,
                    action="keys.retire",
                    target=f"key:{','.join(old.key_ids)}",
                    details={"primary": ring.primary_id},
                )
    for obsolete in report.obsolete_files:
        obsolete.unlink(missing_ok=True)
    runtime.__dict__["keyring"] = ring
    logger.info("key rotation done: primary %s, retired %s", report.primary, report.retired)
    return report
