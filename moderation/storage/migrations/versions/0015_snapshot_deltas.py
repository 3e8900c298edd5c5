"""Delta snapshot versions

``index_snapshots.base_version``: the version a delta snapshot applies on top of (NULL for a
full version); ``changed_entries`` (a delta's added plus removed entries, which compaction
counts); ``compacted_from`` (a full version written by compaction: the version whose content it
holds).

Revision ID: 0015_snapshot_deltas
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_snapshot_deltas"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_snapshots") as batch:
        batch.add_column(sa.Column("base_version", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("changed_entries", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("compacted_from", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_snapshots") as batch:
        batch.drop_column("compacted_from")
        batch.drop_column("changed_entries")
        batch.drop_column("base_version")
