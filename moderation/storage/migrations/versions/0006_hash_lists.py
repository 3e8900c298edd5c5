"""hash-list entries and flood control

``entries.origin`` (``image`` or ``hash_list``: hash-list entries have a PDQ digest and/or keyed
exact hashes in the snapshot, no embedding), ``entries.quarantined_at`` and
``.quarantine_reason`` (noisy-entry quarantine: matches go to review, never block),
``.quarantine_confirmed_on`` (the UTC day an admin last confirmed it out of quarantine), and
``entry_match_counts`` (matches per entry per UTC day, for the flood-control thresholds).

Revision ID: 0006
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("origin", sa.String(length=20), server_default="image", nullable=False)
        )
        batch_op.add_column(sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("quarantine_reason", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("quarantine_confirmed_on", sa.Date(), nullable=True))
    op.create_table(
        "entry_match_counts",
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("matches", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["entries.id"],
            name=op.f("fk_entry_match_counts_entry_id_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", "day", name=op.f("pk_entry_match_counts")),
    )


def downgrade() -> None:
    op.drop_table("entry_match_counts")
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_column("quarantine_confirmed_on")
        batch_op.drop_column("quarantine_reason")
        batch_op.drop_column("quarantined_at")
        batch_op.drop_column("origin")
