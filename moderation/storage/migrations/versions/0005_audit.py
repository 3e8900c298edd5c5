"""audit log guards and resumable erasure

Append-only triggers on ``audit_events`` and ``audit_checkpoints`` (RELIABILITY.md A1): on
PostgreSQL UPDATE, DELETE and TRUNCATE raise ``insufficient_privilege``; on SQLite UPDATE and
DELETE abort (SQLite has no TRUNCATE). Erasure bookkeeping: ``erasure_requests.lookup`` and
``.plan`` (resumable requests), ``uploads.erasure_request_id`` (held uploads awaiting the end of
their legal hold).

Revision ID: 0005
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GUARDED_TABLES = ("audit_events", "audit_checkpoints")

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION moderation_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lookup", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("plan", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_erasure_requests_lookup"), ["lookup"], unique=False)
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erasure_request_id", sa.String(length=32), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_uploads_erasure_request_id"), ["erasure_request_id"], unique=False
        )

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_FUNCTION)
        for table in GUARDED_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION moderation_audit_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION moderation_audit_append_only()"
            )
    elif dialect == "sqlite":
        for table in GUARDED_TABLES:
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'audit log is append-only: {operation} on "
                    f"{table} is not allowed'); END"
                )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table in GUARDED_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS moderation_audit_append_only()")
    elif dialect == "sqlite":
        for table in GUARDED_TABLES:
            for operation in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{operation}")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_uploads_erasure_request_id"))
        batch_op.drop_column("erasure_request_id")
    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_erasure_requests_lookup"))
        batch_op.drop_column("plan")
        batch_op.drop_column("lookup")
