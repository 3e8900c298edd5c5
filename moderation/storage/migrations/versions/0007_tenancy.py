"""tenant isolation

``banks.owner_client_id`` (the API client owning a bank; NULL: the deployment's own bank) and
``banks.shared_with_all`` (the bank applies to every client; existing banks keep applying to
all), ``bank_shares`` (a bank shared with one client), ``api_clients.policy`` (a per-client
policy name), ``review_items.client_id`` (queues filter per client; back-filled from uploads)
and ``users.client_id`` (a reviewer scoped to one client).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "0007"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _client_fk(batch_op: BatchOperations, table: str, column: str, ondelete: str) -> None:
    """Add a nullable, indexed ``column`` referencing ``api_clients.id``."""
    batch_op.add_column(sa.Column(column, sa.Integer(), nullable=True))
    batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)
    batch_op.create_foreign_key(
        batch_op.f(f"fk_{table}_{column}_api_clients"),
        "api_clients",
        [column],
        ["id"],
        ondelete=ondelete,
    )


def upgrade() -> None:
    with op.batch_alter_table("banks", schema=None) as batch_op:
        _client_fk(batch_op, "banks", "owner_client_id", "RESTRICT")
        batch_op.add_column(
            sa.Column("shared_with_all", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    for table in ("review_items", "users"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            _client_fk(batch_op, table, "client_id", "SET NULL")
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy", sa.String(length=100), nullable=True))
    op.create_table(
        "bank_shares",
        sa.Column("bank_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["bank_id"], ["banks.id"], name=op.f("fk_bank_shares_bank_id_banks"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["api_clients.id"],
            name=op.f("fk_bank_shares_client_id_api_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("bank_id", "client_id", name=op.f("pk_bank_shares")),
    )
    op.create_index(op.f("ix_bank_shares_client_id"), "bank_shares", ["client_id"], unique=False)
    op.execute(
        "UPDATE review_items SET client_id = "
        "(SELECT uploads.client_id FROM uploads WHERE uploads.id = review_items.upload_id)"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_bank_shares_client_id"), table_name="bank_shares")
    op.drop_table("bank_shares")
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.drop_column("policy")
    for table, column in (
        ("users", "client_id"),
        ("review_items", "client_id"),
        ("banks", "owner_client_id"),
    ):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(
                batch_op.f(f"fk_{table}_{column}_api_clients"), type_="foreignkey"
            )
            batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))
            batch_op.drop_column(column)
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.drop_column("shared_with_all")
