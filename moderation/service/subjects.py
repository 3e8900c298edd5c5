"""Data-subject pseudonyms: raw subject ids are never stored.

A subject id from an upload hook becomes ``ref`` = HMAC-SHA256(subject secret, subject id),
where each subject has their own random secret (stored wrapped by a master key). The row is
found by ``lookup`` = HMAC-SHA256(deployment lookup key, subject id). Erasure deletes the row:
the secret is destroyed, so stored ``ref`` values (in audit events, uploads) can no longer be
linked to the person, while the audit hash chain still verifies.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moderation.crypto.deployment import deployment_secret
from moderation.crypto.envelope import generate_data_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Subject

LOOKUP_SECRET_NAME = "subject-lookup"  # noqa: S105 - a name, not a secret


def _hmac(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def lookup_key(session: Session, keyring: KeyRing, subject_id: str) -> str:
    """The keyed lookup hash of a raw subject id (hex)."""
    return _hmac(deployment_secret(session, keyring, LOOKUP_SECRET_NAME), subject_id)


def find_subject(session: Session, keyring: KeyRing, subject_id: str) -> Subject | None:
    """The subject row for a raw subject id, or None (never seen, or erased)."""
    lookup = lookup_key(session, keyring, subject_id)
    return session.scalar(select(Subject).where(Subject.lookup == lookup))


def _locked_subject(session: Session, lookup: str) -> Subject | None:
    # FOR SHARE (PostgreSQL; SQLite transactions are already serialised): an erasure deleting
    # this row waits until the caller's upload is committed, then sees and erases it too.
    return session.scalar(
        select(Subject).where(Subject.lookup == lookup).with_for_update(read=True)
    )


def pseudonymize(session: Session, keyring: KeyRing, subject_id: str) -> str:
    """The subject's pseudonym ``ref`` (64 hex chars), creating their secret on first sight.

    Safe under concurrency: when two transactions see a new subject at once, the loser of the
    insert (unique ``lookup``) rolls back to a savepoint and uses the winner's row.

    Raises:
        ValueError: empty subject id.
    """
    if not subject_id:
        raise ValueError("subject id must not be empty")
    lookup = lookup_key(session, keyring, subject_id)
    subject = _locked_subject(session, lookup)
    if subject is None:
        secret = generate_data_key()
        subject = Subject(
            lookup=lookup,
            ref=_hmac(secret, subject_id),
            secret=wrap_key(secret, keyring, context=f"subject:{lookup}").to_bytes(),
        )
        try:
            with session.begin_nested():
                session.add(subject)
        except IntegrityError:
            subject = _locked_subject(session, lookup)
            if subject is None:
                raise
    return subject.ref
