"""legal holds as rows

``legal_holds``: one row per hold on an upload (``automatic`` from a block decision, ``review``
from a reviewer's confirm, ``manual`` placed by an admin or the DPO with a reason), with who
placed it, until when, and who released it and why. ``uploads.legal_hold_until`` stays the
effective hold (the latest ``until`` of the holds not released). Existing holds are copied into
the table as ``automatic`` holds.

Revision ID: 0010
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "legal_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("placed_by", sa.String(length=200), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=200), nullable=True),
        sa.Column("release_reason", sa.String(length=1000), nullable=True),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_legal_holds_upload_id_uploads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_legal_holds")),
    )
    with op.batch_alter_table("legal_holds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_legal_holds_upload_id"), ["upload_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_legal_holds_until"), ["until"], unique=False)
    op.execute(
        "INSERT INTO legal_holds (upload_id, source, reason, placed_by, placed_at, until) "
        "SELECT id, 'automatic', 'policy legal hold (recorded before holds had rows)', "
        "'migration', received_at, legal_hold_until FROM uploads "
        "WHERE legal_hold_until IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("legal_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_legal_holds_until"))
        batch_op.drop_index(batch_op.f("ix_legal_holds_upload_id"))
    op.drop_table("legal_holds")
