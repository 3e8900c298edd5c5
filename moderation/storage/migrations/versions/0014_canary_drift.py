"""Golden-set canary and drift monitoring

``canary_items`` (the golden set's labelled images, pixels sealed in ``<data_dir>/canary``),
``canary_runs`` (each run's figures) and ``drift_runs`` (each drift check's score per signal).

Revision ID: 0014
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "canary_items",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("label", sa.String(10), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=True),
        sa.Column("bank_id", sa.Integer(), nullable=True),
        sa.Column("edit", sa.String(40), nullable=False),
        sa.Column("blob_ref", sa.String(200), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("added_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["entries.id"],
            name=op.f("fk_canary_items_entry_id_entries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["bank_id"],
            ["banks.id"],
            name=op.f("fk_canary_items_bank_id_banks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_items")),
    )
    op.create_index(op.f("ix_canary_items_label"), "canary_items", ["label"])
    op.create_index(op.f("ix_canary_items_entry_id"), "canary_items", ["entry_id"])
    op.create_table(
        "canary_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("encoder_id", sa.String(500), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("passed_slo", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_runs")),
    )
    op.create_index(op.f("ix_canary_runs_created_at"), "canary_runs", ["created_at"])
    op.create_index(op.f("ix_canary_runs_encoder_id"), "canary_runs", ["encoder_id"])
    op.create_table(
        "drift_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signal", sa.String(100), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_runs")),
    )
    op.create_index(op.f("ix_drift_runs_created_at"), "drift_runs", ["created_at"])
    op.create_index(op.f("ix_drift_runs_signal"), "drift_runs", ["signal"])


def downgrade() -> None:
    op.drop_table("drift_runs")
    op.drop_table("canary_runs")
    op.drop_table("canary_items")
