"""queue: callback deliveries, worker heartbeats, callback attempt -> delivery link

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 22:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=True),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["api_clients.id"],
            name=op.f("fk_callback_deliveries_client_id_api_clients"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_callback_deliveries_upload_id_uploads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
    )
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_callback_deliveries_due", ["state", "next_attempt_at"])
        batch_op.create_index(batch_op.f("ix_callback_deliveries_upload_id"), ["upload_id"])

    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("encoder_id", sa.String(length=500), nullable=True),
        sa.Column("snapshot_version", sa.Integer(), nullable=True),
        sa.Column("snapshot_loaded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_heartbeats")),
    )
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_heartbeats_updated_at"), ["updated_at"])

    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delivery_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_callback_attempts_delivery_id"), ["delivery_id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_callback_attempts_delivery_id_callback_deliveries"),
            "callback_deliveries",
            ["delivery_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_callback_attempts_delivery_id_callback_deliveries"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_callback_attempts_delivery_id"))
        batch_op.drop_column("delivery_id")
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_heartbeats_updated_at"))
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_deliveries_upload_id"))
        batch_op.drop_index("ix_callback_deliveries_due")
    op.drop_table("callback_deliveries")
