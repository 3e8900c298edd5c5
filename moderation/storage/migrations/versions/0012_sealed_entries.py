"""sealed entry fields: labels and source refs encrypted, content hashes keyed

``banks.entry_key`` (the bank's entry-field data key, wrapped by a master key);
``entries.label_sealed`` / ``.source_ref_sealed`` (AES-256-GCM) replace ``label`` /
``source_ref``; ``entries.source_hmac`` replaces ``source_sha256`` and ``uploads.content_hmac``
replaces ``uploads.sha256`` (HMAC-SHA256 under the exact-hash deployment secret). Existing rows
are converted by the ``entry_sealer`` hook that ``moderation.banks.sealed_fields`` hands to
Alembic (the storage layer has no keys): without it the upgrade refuses to run on a database
that holds entries or uploads. The plaintext columns are dropped; on SQLite with
``secure_delete`` on, so their old pages are zeroed.

Revision ID: 0012
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NO_KEYS = (
    "migration 0012 must encrypt the labels and source refs of existing bank entries and key "
    "their hashes, which needs the master keys: run `moderation init` (it migrates with the "
    "deployment's key ring)"
)


def _add_columns() -> None:
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("entry_key", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label_sealed", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("source_ref_sealed", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("source_hmac", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_entries_source_hmac"), ["source_hmac"], unique=False)
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content_hmac", sa.String(length=64), nullable=True))


def _convert() -> None:
    bind = op.get_bind()
    entries = bind.execute(
        sa.text("SELECT id, bank_id, label, source_ref, source_sha256 FROM entries")
    ).all()
    uploads = bind.execute(sa.text("SELECT id, sha256 FROM uploads WHERE sha256 IS NOT NULL")).all()
    if not entries and not uploads:
        return
    sealer = context.config.attributes.get("entry_sealer")
    if sealer is None:
        raise RuntimeError(_NO_KEYS)
    entry_values, upload_values = sealer(bind, entries, uploads)
    if entry_values:
        bind.execute(
            sa.text(
                "UPDATE entries SET label_sealed = :label_sealed, "
                "source_ref_sealed = :source_ref_sealed, source_hmac = :source_hmac "
                "WHERE id = :id"
            ),
            entry_values,
        )
    if upload_values:
        bind.execute(
            sa.text("UPDATE uploads SET content_hmac = :content_hmac WHERE id = :id"),
            upload_values,
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA secure_delete=ON")
    _add_columns()
    _convert()
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_entries_source_sha256"))
        batch_op.drop_column("source_sha256")
        batch_op.drop_column("source_ref")
        batch_op.drop_column("label")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_column("sha256")


def downgrade() -> None:
    # The sealed values cannot be turned back into plaintext here (no keys), and a bank whose
    # labels and duplicate hashes were silently blanked is worse than a refused downgrade.
    count = op.get_bind().execute(sa.text("SELECT count(*) FROM entries")).scalar()
    if count:
        raise RuntimeError("migration 0012 cannot be undone on a database holding bank entries")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
        batch_op.drop_column("content_hmac")
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label", sa.String(length=500), nullable=False))
        batch_op.add_column(sa.Column("source_ref", sa.String(length=1000), nullable=False))
        batch_op.add_column(sa.Column("source_sha256", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_entries_source_sha256"), ["source_sha256"], unique=False
        )
        batch_op.drop_index(batch_op.f("ix_entries_source_hmac"))
        batch_op.drop_column("source_hmac")
        batch_op.drop_column("source_ref_sealed")
        batch_op.drop_column("label_sealed")
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.drop_column("entry_key")
