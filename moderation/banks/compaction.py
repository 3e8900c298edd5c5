"""Compaction of delta snapshot chains: after enough deltas, the chain written as one full
version.

A delta version (:mod:`moderation.banks.snapshot_delta`) is cheap to write and to apply, but
every reader of the full payload composes its chain, and the full version it builds on keeps
the signals of entries removed since. The compaction job (Celery beat,
``moderation.compact_snapshots``) writes a chain's composed payload as a new full version once
it holds ``snapshot_compact_after`` deltas or its deltas changed ``snapshot_compact_fraction``
of the full version's entries; the old full version and its deltas are then pruned like any
superseded version (:func:`moderation.banks.retention.prune_snapshots`). A compacted version
records the version whose content it holds (``compacted_from``), so workers at that version
only move their version number on (:func:`moderation.banks.blocklist.catch_up`). Erasure
compacts at once and without ``compacted_from``, so workers reload and drop the erased
signals from memory too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from moderation.banks.delta_chain import chain_of
from moderation.banks.disk_compaction import compact_disk_chain
from moderation.banks.retention import kept_snapshots, prune_snapshots
from moderation.banks.snapshot import SnapshotFile
from moderation.banks.versions import (
    keeps_row_files,
    lock_snapshots,
    read_payload,
    write_payload,
)
from moderation.crypto.keys import KeyRing
from moderation.storage.db import transaction
from moderation.storage.models import IndexSnapshot

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactionRule:
    """When a chain is due: ``after_deltas`` deltas (>= 1), or its deltas' added plus removed
    entries reaching ``changed_fraction`` of the full version's active entries."""

    after_deltas: int = 8
    changed_fraction: float = 0.05


def compaction_due(session: Session, head: IndexSnapshot, rule: CompactionRule) -> bool:
    """Whether the chain ending at ``head`` is due for compaction (a full version never is).

    Raises:
        SnapshotError: the chain is broken (see :func:`moderation.banks.delta_chain.chain_of`).
    """
    if head.base_version is None:
        return False
    chain = chain_of(session, head)
    deltas = chain[1:]
    changed = sum(row.changed_entries for row in deltas)
    return len(deltas) >= rule.after_deltas or changed >= rule.changed_fraction * max(
        chain[0].entry_count, 1
    )


def compact_chains(
    session: Session,
    *,
    keyring: KeyRing,
    snapshots_dir: Path,
    rule: CompactionRule,
    force: bool = False,
    erasure: bool = False,
    written: list[tuple[IndexSnapshot, Path]] | None = None,
) -> list[tuple[IndexSnapshot, Path]]:
    """Write every kept chain that ends in a due delta (every one ending in a delta when
    ``force``) as a new full version equal in content to its full version plus its deltas.
    ``erasure``: record no ``compacted_from`` (workers reload in full). Adds the rows; the
    caller commits, then prunes. Returns the new rows and their files, also appended to
    ``written`` as they are written (so a caller can delete them when a later chain fails).

    Raises:
        SnapshotError: a chain cannot be read (missing, altered or out-of-order delta).
    """
    lock_snapshots(session)
    written = [] if written is None else written
    for head in kept_snapshots(session):
        if head.base_version is None or not (force or compaction_due(session, head, rule)):
            continue
        row, file = _compact_one(session, keyring, snapshots_dir, head, erasure=erasure)
        logger.info(
            "compacted snapshot chain v%s..v%d into full v%d",
            head.base_version,
            head.version,
            row.version,
        )
        written.append((row, file.path))
    return written


def _compact_one(
    session: Session, keyring: KeyRing, snapshots_dir: Path, head: IndexSnapshot, *, erasure: bool
) -> tuple[IndexSnapshot, SnapshotFile]:
    """The chain ending at ``head`` as one new full version: streamed when its full version
    keeps an ``ivf_disk`` row file (:mod:`moderation.banks.disk_compaction`), else composed
    and rebuilt. Raises as :func:`compact_chains`."""
    compacted_from = None if erasure else head.version
    if keeps_row_files(snapshots_dir, chain_of(session, head)[0]):
        streamed = compact_disk_chain(
            session, keyring, snapshots_dir, head, compacted_from=compacted_from
        )
        if streamed is not None:
            return streamed
    payload = read_payload(session, keyring, snapshots_dir, head)
    return write_payload(session, keyring, snapshots_dir, payload, compacted_from=compacted_from)


def compact_snapshots(runtime: Runtime, *, force: bool = False, erasure: bool = False) -> list[int]:
    """Compact due chains in one transaction (:func:`compact_chains`, rule from settings),
    prune the superseded versions after the commit, and tell listeners; the new versions.

    Raises:
        SnapshotError: as :func:`compact_chains` (nothing is written then).
    """
    settings = runtime.settings
    rule = CompactionRule(settings.snapshot_compact_after, settings.snapshot_compact_fraction)
    written: list[tuple[IndexSnapshot, Path]] = []
    try:
        with transaction(runtime.sessions) as session:
            compact_chains(
                session,
                keyring=runtime.keyring,
                snapshots_dir=settings.snapshots_dir,
                rule=rule,
                force=force,
                erasure=erasure,
                written=written,
            )
            versions = [row.version for row, _ in written]
    except BaseException:
        for _, path in written:
            path.unlink(missing_ok=True)
        raise
    with transaction(runtime.sessions) as session:
        prune_snapshots(session, settings.snapshots_dir)
    if versions:
        runtime.notify_change("snapshot")
    return versions
