"""statements of reasons and appeals

``decisions``: one row per decision on an upload (the screening's, a reviewer's, an appeal's)
with its DSA statement-of-reasons fields; existing screenings and settled review items are
copied in (ground ``incompatible_with_terms`` for blocks: the default category's policy).
``appeals``: a platform's appeal of one decision (one per decision).

Revision ID: 0011
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BACKFILL_SCREENINGS = """
INSERT INTO decisions (upload_id, source, decision, decision_ground, automated_detection,
    automated_decision, content_type, category, policy, reason, decided_by, created_at)
SELECT upload_id, 'screening', decision,
    CASE WHEN decision = 'block' THEN 'incompatible_with_terms' END,
    TRUE, TRUE, 'image', category, policy, reason, NULL, created_at
FROM screenings ORDER BY id
"""
_BACKFILL_REVIEWS = """
INSERT INTO decisions (upload_id, source, decision, decision_ground, automated_detection,
    automated_decision, content_type, category, policy, reason, decided_by, created_at)
SELECT r.upload_id, 'review', CASE WHEN r.decision = 'confirm' THEN 'block' ELSE 'allow' END,
    CASE WHEN r.decision = 'confirm' THEN 'incompatible_with_terms' END,
    TRUE, FALSE, 'image', r.category, s.policy, 'review_' || r.decision, r.decided_by,
    r.decided_at
FROM review_items r LEFT JOIN screenings s ON s.upload_id = r.upload_id
WHERE r.state = 'decided' AND r.decision IN ('confirm', 'not_a_match') ORDER BY r.decided_at
"""


def _user_fk(table: str, column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["users.id"], name=op.f(f"fk_{table}_{column}_users"), ondelete="SET NULL"
    )


def upgrade() -> None:
    _create_decisions()
    _create_appeals()
    op.execute(_BACKFILL_SCREENINGS)
    op.execute(_BACKFILL_REVIEWS)


def _create_decisions() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("decision_ground", sa.String(length=40), nullable=True),
        sa.Column("automated_detection", sa.Boolean(), nullable=False),
        sa.Column("automated_decision", sa.Boolean(), nullable=False),
        sa.Column("content_type", sa.String(length=32), nullable=False),
        sa.Column("category", sa.String(length=100), nullable=True),
        sa.Column("policy", sa.String(length=100), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("decided_by", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_decisions_upload_id_uploads"),
            ondelete="CASCADE",
        ),
        _user_fk("decisions", "decided_by"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    op.create_index(op.f("ix_decisions_upload_id"), "decisions", ["upload_id"])
    op.create_index(op.f("ix_decisions_created_at"), "decisions", ["created_at"])


def _create_appeals() -> None:
    op.create_table(
        "appeals",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=True),
        sa.Column("decision_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("original_decision", sa.String(length=16), nullable=False),
        sa.Column("original_decided_by", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.Integer(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("decided_by", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_appeals_upload_id_uploads"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["api_clients.id"],
            name=op.f("fk_appeals_client_id_api_clients"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["decisions.id"],
            name=op.f("fk_appeals_decision_id_decisions"),
            ondelete="CASCADE",
        ),
        _user_fk("appeals", "original_decided_by"),
        _user_fk("appeals", "claimed_by"),
        _user_fk("appeals", "decided_by"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_appeals")),
        sa.UniqueConstraint("decision_id", name=op.f("uq_appeals_decision_id")),
    )
    op.create_index(op.f("ix_appeals_upload_id"), "appeals", ["upload_id"])
    op.create_index(op.f("ix_appeals_state"), "appeals", ["state"])


def downgrade() -> None:
    op.drop_table("appeals")
    op.drop_table("decisions")
