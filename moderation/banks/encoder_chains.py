"""Which encoder's snapshot chain serves, which one shadows, and which ones are kept.

Snapshots of every encoder live in one table, ``index_snapshots``, numbered by one global
version sequence; a *chain* is the rows of one ``encoder_id``. Without an encoder migration
(``moderation encoder migrate``, :mod:`moderation.modelops.encoder_migration`) there is one
chain and the newest row serves, as before. With one, the newest
:class:`~moderation.storage.encoders.EncoderMigration` decides:

=============================  ===================  =====================  ================
state of the newest migration  serving chain        shadow chain           also kept
=============================  ===================  =====================  ================
``running``, ``ready``         source               target                 -
``promoted``                   target               -                      source (rollback)
``rolled_back``                source               -                      target
``cancelled``, ``failed``      source               -                      -
=============================  ===================  =====================  ================
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.storage.encoders import EncoderMigration

#: Migration states in which the target encoder shadows the serving one.
SHADOW_STATES = ("running", "ready")


@dataclass(frozen=True)
class EncoderChains:
    """The serving encoder (name and id; None without a migration: the configured one serves,
    and its id is that of the newest snapshot), the shadowing one, and every kept chain."""

    serving_name: str | None
    serving_id: str | None
    shadow_name: str | None = None
    shadow_id: str | None = None
    kept_ids: tuple[str, ...] = ()
    migration_id: str | None = None


def latest_migration(session: Session) -> EncoderMigration | None:
    """The newest encoder migration, or None."""
    return session.scalar(
        select(EncoderMigration).order_by(EncoderMigration.created_at.desc()).limit(1)
    )


def encoder_chains(session: Session) -> EncoderChains:
    """The chains as the newest migration leaves them (see the module docstring)."""
    row = latest_migration(session)
    if row is None:
        return EncoderChains(None, None)
    source, target = (row.source_name, row.source_id), (row.target_name, row.target_id)
    if row.state == "promoted":
        kept = (target[1] or "", source[1])
        return EncoderChains(*target, kept_ids=kept, migration_id=row.id)
    kept_ids: tuple[str, ...] = (source[1],)
    if row.state in SHADOW_STATES and target[1]:
        return EncoderChains(*source, *target, kept_ids=(source[1], target[1]), migration_id=row.id)
    if row.state == "rolled_back" and target[1]:
        kept_ids = (source[1], target[1])
    return EncoderChains(*source, kept_ids=kept_ids, migration_id=row.id)
