"""RELIABILITY.md A4: signed checkpoints catch a truncated tail, a rewritten chain and re-signed
checkpoints (tampering as in ``test_audit_log_tampering.py``).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from moderation.audit.log import (
    compute_hash,
    sign_document,
)
from moderation.audit.offline import CHECKPOINT_TYPE
from moderation.audit.verify import verify_chain
from moderation.storage.db import transaction
from moderation.storage.models import AuditCheckpoint, AuditEvent
from tests.conftest import (
    Db,
    unguard,
)

# --- A4 and checkpoints ---------------------------------------------------------------------


def test_a4_truncated_tail_is_detected_against_the_last_checkpoint(db: Db) -> None:
    db.events(9)  # seqs 1..10
    checkpoint = db.checkpoint()
    assert checkpoint is not None and checkpoint.seq == 10
    assert db.verify().ok
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq >= 8")
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == 8
    assert "truncated" in (result.problem or "")
    assert result.count == 7


def test_a4_tail_after_the_last_checkpoint_is_the_undetectable_window(db: Db) -> None:
    db.events(4)
    db.checkpoint()  # seq 5
    db.events(3, start=4)
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq > 5")
    assert db.verify().ok  # hence periodic checkpoints (audit_checkpoint_every)


def test_rewritten_chain_is_caught_by_the_checkpoint(db: Db) -> None:
    """Editing row 3 and recomputing every later hash fools the chain, not the signature."""
    db.events(6)
    db.checkpoint()  # seq 7
    unguard(db)
    from moderation.audit.log import event_body

    with transaction(db.sessions) as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        prev = rows[1].hash
        for row in rows[2:]:
            if row.seq == 3:
                row.actor = "user:666"
            row.prev_hash = prev
            row.hash = compute_hash(prev, event_body(row))
            prev = row.hash
    result = db.verify()
    assert not result.ok
    assert result.first_bad_seq == 1  # no earlier checkpoint vouches for anything before seq 7
    assert "rewritten" in (result.problem or "")


def test_resigned_checkpoints_fail_under_the_pinned_key(db: Db) -> None:
    db.events(6)
    db.checkpoint()
    unguard(db)
    db.execute("DELETE FROM audit_events WHERE seq >= 5")
    db.execute("DELETE FROM audit_checkpoints")
    # The attacker signs a checkpoint for the truncated head with a key of their own.
    attacker = Ed25519PrivateKey.generate()
    with db.sessions() as session:
        head = session.execute(
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        ).one()
    signed = sign_document(
        {"type": CHECKPOINT_TYPE, "seq": head.seq, "head_hash": head.hash}, attacker
    )
    with transaction(db.sessions) as session:
        session.add(
            AuditCheckpoint(
                seq=head.seq,
                head_hash=head.hash,
                signature=signed["signature"],
                public_key=signed["public_key"],
            )
        )
    pinned = db.verify()
    assert not pinned.ok and pinned.key_pinned
    assert "signature does not verify" in (pinned.problem or "")
    with db.sessions() as session:
        unpinned = verify_chain(session)  # trusts the key stored beside the checkpoint
    assert unpinned.ok and not unpinned.key_pinned


def test_deleted_signing_key_with_checkpoints_fails(db: Db) -> None:
    db.events(3)
    db.checkpoint()
    db.execute("DELETE FROM deployment_secrets WHERE name = 'audit-signing-key'")
    result = db.verify()
    assert not result.ok and "signing key is missing" in (result.problem or "")


def test_checkpoint_is_written_once_per_head(db: Db) -> None:
    from moderation.audit.log import checkpoint_if_due

    db.events(3)
    assert db.checkpoint() is not None
    assert db.checkpoint() is None  # head unchanged
    db.events(2, start=3)
    with transaction(db.sessions) as session:
        assert checkpoint_if_due(session, db.keyring, every=3) is None
    db.events(1, start=5)
    with transaction(db.sessions) as session:
        due = checkpoint_if_due(session, db.keyring, every=3)
        assert due is not None and due.seq == 7
    result = db.verify()
    assert result.ok and result.checkpoints == 2
