"""encoder blue-green migration and the originals vault

``banks.retain_originals`` (opt-in: entries' originals kept sealed, each under its own data
key), ``entry_originals`` (the wrapped key and blob of each kept original), and
``encoder_migrations`` / ``shadow_decisions`` (``moderation encoder migrate``: progress, state,
and the target encoder's decision on each upload screened while it shadows).

Revision ID: 0013
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("retain_originals", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_table(
        "entry_originals",
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("blob_ref", sa.String(length=200), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(length=100), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["entries.id"],
            name=op.f("fk_entry_originals_entry_id_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_entry_originals")),
    )
    op.create_table(
        "encoder_migrations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("source_name", sa.String(length=500), nullable=False),
        sa.Column("source_id", sa.String(length=500), nullable=False),
        sa.Column("target_name", sa.String(length=500), nullable=False),
        sa.Column("target_id", sa.String(length=500), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("without_originals", sa.Integer(), nullable=False),
        sa.Column("embed_seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_encoder_migrations")),
    )
    op.create_index(
        op.f("ix_encoder_migrations_state"), "encoder_migrations", ["state"], unique=False
    )
    op.create_table(
        "shadow_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("migration_id", sa.String(length=32), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("category", sa.String(length=100), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("shadow_decision", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["migration_id"],
            ["encoder_migrations.id"],
            name=op.f("fk_shadow_decisions_migration_id_encoder_migrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_decisions")),
    )
    op.create_index(op.f("ix_shadow_decisions_migration_id"), "shadow_decisions", ["migration_id"])
    op.create_index(op.f("ix_shadow_decisions_upload_id"), "shadow_decisions", ["upload_id"])


def downgrade() -> None:
    op.drop_table("shadow_decisions")
    op.drop_table("encoder_migrations")
    op.drop_table("entry_originals")
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.drop_column("retain_originals")
