"""Verifying the audit chain and its signed checkpoints (:func:`verify_chain`).

Walks every event of the hash chain written by :mod:`moderation.audit.log` and checks each
Ed25519-signed checkpoint against a pinned public key, reporting the first sequence number that
is edited, missing, re-linked, rewritten under a checkpoint, or cut off the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import (
    AuditKeyError,
    EventFields,
    checkpoint_document,
    event_body,
    public_key_hex,
    signing_key,
    stream_events,
)
from moderation.audit.offline import (
    CHECKPOINT_TYPE,
    GENESIS_HASH,
    compute_hash,
    load_public_key,
    verify_signature,
)
from moderation.crypto.keys import KeyRing
from moderation.storage.models import AuditCheckpoint


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`.

    Attributes:
        ok: the chain and every checkpoint verify.
        count: events examined.
        first_bad_seq: the first sequence number that is wrong, missing or unanchored.
        problem: what is wrong, for people.
        head_seq, head_hash: the last event examined.
        checkpoints: signed checkpoints that verified.
        public_key: the key checkpoints were checked against (hex), if any.
        key_pinned: True when that key came from the caller or the deployment's own secret;
            False when only the keys stored beside the checkpoints were available (then a
            writer of the database could have re-signed them).
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    checkpoints: int = 0
    public_key: str | None = None
    key_pinned: bool = False


def _pinned_key(
    session: Session,
    public_key: str | bytes | Ed25519PublicKey | None,
    keyring: KeyRing | None,
) -> Ed25519PublicKey | None:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, bytes):
        return Ed25519PublicKey.from_public_bytes(public_key)
    if isinstance(public_key, str):
        return load_public_key(public_key)
    if keyring is not None:
        try:
            return signing_key(session, keyring).public_key()
        except AuditKeyError:
            return None
    return None


def _checkpoint_failure(
    cp: AuditCheckpoint,
    key: Ed25519PublicKey,
    key_hex: str | None,
    anchors: dict[int, str],
    *,
    pinned: bool,
) -> VerifyResult | None:
    """Why ``cp`` does not verify under ``key`` or contradicts an earlier checkpoint, if so."""
    document = {
        **checkpoint_document(cp.seq, cp.head_hash),
        "public_key": cp.public_key,
        "signature": cp.signature,
    }
    if verify_signature(document, key, expected_type=CHECKPOINT_TYPE) is not None:
        return VerifyResult(
            False,
            0,
            cp.seq,
            f"checkpoint {cp.id} (seq {cp.seq}): the Ed25519 signature does not verify "
            f"under the audit key {key_hex}",
            public_key=key_hex,
            key_pinned=pinned,
        )
    if anchors.get(cp.seq, cp.head_hash) != cp.head_hash:
        return VerifyResult(False, 0, cp.seq, f"two signed checkpoints disagree about seq {cp.seq}")
    return None


def _verify_checkpoints(
    checkpoints: list[AuditCheckpoint], pinned: Ed25519PublicKey | None
) -> tuple[dict[int, str], str | None, VerifyResult | None]:
    """Check every checkpoint in order.

    Returns the anchors (seq -> signed head hash), the key they were checked against (hex; the
    first checkpoint's own key when none is pinned) and the failure, if one does not verify.
    """
    key_hex = public_key_hex(pinned) if pinned is not None else None
    anchors: dict[int, str] = {}
    for cp in checkpoints:
        key = pinned
        if key is None:
            if key_hex is None:
                key_hex = cp.public_key
            if cp.public_key != key_hex:
                return (
                    anchors,
                    key_hex,
                    VerifyResult(
                        False,
                        0,
                        cp.seq,
                        f"checkpoint {cp.id} (seq {cp.seq}) is signed by another key "
                        f"({cp.public_key}) than the earlier checkpoints ({key_hex})",
                        public_key=key_hex,
                    ),
                )
            key = load_public_key(cp.public_key)
        failure = _checkpoint_failure(cp, key, key_hex, anchors, pinned=pinned is not None)
        if failure is not None:
            return anchors, key_hex, failure
        anchors[cp.seq] = cp.head_hash
    return anchors, key_hex, None


def _event_failure(
    event: EventFields, expected: int, prev_hash: str, anchored: str | None, last_anchor: int
) -> tuple[int, str] | None:
    """The first bad seq and the problem, when ``event`` does not extend the chain correctly."""
    if event.seq != expected:
        return (
            expected,
            f"seq {expected} is missing (the next event is seq {event.seq}): events were deleted",
        )
    if event.prev_hash != prev_hash:
        return (
            event.seq,
            f"seq {event.seq}: prev_hash does not match the hash of seq {event.seq - 1} "
            "(an event was inserted or re-linked)",
        )
    if compute_hash(prev_hash, event_body(event)) != event.hash:
        return (
            event.seq,
            f"seq {event.seq}: hash mismatch (the event was edited after it was written)",
        )
    if anchored is not None and anchored != event.hash:
        return (
            last_anchor + 1,
            f"seq {last_anchor + 1}..{event.seq} were rewritten: seq {event.seq} does "
            "not match its signed checkpoint",
        )
    return None


@dataclass
class _ChainWalk:
    """How far the events verified, and the first problem met."""

    count: int = 0
    head_seq: int | None = None
    head_hash: str = GENESIS_HASH
    bad_seq: int | None = None
    problem: str | None = None


def _walk_chain(session: Session, anchors: dict[int, str]) -> _ChainWalk:
    walk = _ChainWalk()
    last_anchor = 0
    for event in stream_events(session):
        failure = _event_failure(
            event, walk.count + 1, walk.head_hash, anchors.get(event.seq), last_anchor
        )
        if failure is not None:
            walk.bad_seq, walk.problem = failure
            return walk
        if event.seq in anchors:
            last_anchor = event.seq
        walk.head_hash, walk.head_seq = event.hash, event.seq
        walk.count += 1
    expected = walk.count + 1
    last_signed = max(anchors, default=0)
    if last_signed >= expected:
        walk.bad_seq = expected
        walk.problem = (
            f"events from seq {expected} on are missing: a signed checkpoint covers seq "
            f"{last_signed} (the tail was truncated)"
        )
    return walk


def verify_chain(
    session: Session,
    *,
    public_key: str | bytes | Ed25519PublicKey | None = None,
    keyring: KeyRing | None = None,
) -> VerifyResult:
    """Walk the whole chain and the signed checkpoints; report the first bad sequence number.

    Detects an edited event (its hash no longer matches: reported at its own seq), a deleted
    middle event (a gap: reported at the missing seq), an inserted or re-linked event (its
    ``prev_hash`` does not match its predecessor), a chain rewritten under a checkpoint, and a
    truncated tail (the last signed checkpoint lies beyond the last event: reported at the
    first missing seq). Events appended after the last checkpoint by someone recomputing the
    hashes cannot be told from genuine ones: checkpoints bound that window.

    Args:
        public_key: the audit public key to pin (hex, raw bytes or a key object), e.g. one kept
            offline from ``moderation audit public-key``.
        keyring: the master keys; the public key is then derived from the deployment's own
            signing secret. The console and the CLI pass this.

    With neither, checkpoints are checked against the key stored beside them, which all must
    share; ``key_pinned`` is then False. Reads only.

    Raises:
        ValueError: ``public_key`` is malformed.
        moderation.crypto.errors.CryptoError: the signing secret does not unwrap under ``keyring``.
    """
    pinned = _pinned_key(session, public_key, keyring)
    checkpoints = list(
        session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq, AuditCheckpoint.id))
    )
    if keyring is not None and pinned is None and checkpoints:
        return VerifyResult(
            False,
            0,
            checkpoints[0].seq,
            "the audit signing key is missing from deployment_secrets although signed "
            "checkpoints exist: it was deleted",
            checkpoints=0,
        )
    anchors, key_hex, failure = _verify_checkpoints(checkpoints, pinned)
    if failure is not None:
        return failure
    walk = _walk_chain(session, anchors)
    return VerifyResult(
        walk.problem is None,
        walk.count,
        walk.bad_seq,
        walk.problem,
        head_seq=walk.head_seq,
        head_hash=walk.head_hash if walk.count else None,
        checkpoints=len(anchors),
        public_key=key_hex,
        key_pinned=pinned is not None,
    )
