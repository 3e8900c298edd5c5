"""API-client lifecycle

``api_clients.revoked_at`` (revocation is final: the token is refused from then on),
``.token_rotated_at`` and ``.secret_rotated_at`` (the last rotation of the bearer token and of
the callback secret) and ``.last_used_at`` (the last authenticated request, to the minute).

Revision ID: 0008
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("revoked_at", "token_rotated_at", "secret_rotated_at", "last_used_at")


def upgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
