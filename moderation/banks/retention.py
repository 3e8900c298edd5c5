"""Snapshot retention: which versions are kept, and pruning the rest (files and rows).

The newest version of each kept chain is kept (:func:`kept_snapshots`) and, for a delta
version, every version it builds on; everything else is deleted with its row files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.encoder_chains import encoder_chains
from moderation.banks.versions import REGIONS_SUFFIX, ROWS_SUFFIX, current_snapshot
from moderation.storage.models import IndexSnapshot


def kept_snapshots(session: Session) -> list[IndexSnapshot]:
    """The newest row of the serving chain and of every other kept chain (an encoder
    migration's target while it shadows, the previous encoder's after promotion)."""
    rows = [current_snapshot(session)]
    rows += [current_snapshot(session, eid) for eid in encoder_chains(session).kept_ids]
    return list({row.version: row for row in rows if row is not None}.values())


def _kept_with_bases(session: Session, kept: Sequence[IndexSnapshot]) -> list[IndexSnapshot]:
    """``kept`` and, for a delta, every older version its chain builds on (as far as the
    chain is intact: readers refuse a broken one, and the next full version retires it)."""
    rows: dict[int, IndexSnapshot] = {}
    for row in kept:
        rows[row.version] = row
        while row.base_version is not None and row.base_version < row.version:
            older = session.get(IndexSnapshot, row.base_version)
            if older is None:
                break
            rows[older.version] = row = older
    return list(rows.values())


def prune_snapshots(session: Session, snapshots_dir: Path) -> list[Path]:
    """Delete every snapshot file (with its row files) and row but the newest of each kept
    chain (:func:`kept_snapshots`) and, for a delta, the full version and deltas it builds on.

    Old snapshots hold signals of erased or deleted entries, so they are not kept around
    (the kept chains are rewritten without them:
    :func:`~moderation.banks.versions.sync_kept_chains`); a delta chain's base keeps removed
    entries' signals until compaction retires it (:mod:`moderation.banks.compaction`; erasure
    compacts at once). Returns the deleted paths.
    """
    kept = _kept_with_bases(session, kept_snapshots(session))
    if not kept:
        return []
    removed: list[Path] = []
    versions = [row.version for row in kept]
    for old in session.scalars(select(IndexSnapshot).where(IndexSnapshot.version.not_in(versions))):
        session.delete(old)
    # A snapshot's row files share its stem (:func:`~moderation.banks.versions.rows_path_of`).
    stems = {Path(row.path).stem for row in kept}
    for path in [
        *snapshots_dir.glob("*.snapshot"),
        *snapshots_dir.glob(f"*{ROWS_SUFFIX}"),
        *snapshots_dir.glob(f"*{REGIONS_SUFFIX}"),
    ]:
        if path.stem not in stems:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
