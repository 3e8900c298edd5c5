"""Deployment-wide secrets: random 32-byte keys kept in the database, wrapped by the master keys.

One row per name in ``deployment_secrets``; rotation re-wraps them with every other data key
(:mod:`moderation.governance.keys`). This module sits above :mod:`moderation.storage` (it reads
and writes those rows) and below everything that needs such a key.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.storage.models import DeploymentSecret


def _context(name: str) -> str:
    return f"deployment-secret:{name}"


def deployment_secret(session: Session, keyring: KeyRing, name: str) -> bytes:
    """A 32-byte deployment-wide secret named ``name``, created on first use.

    Stored in ``deployment_secrets`` wrapped by the primary master key (context
    ``deployment-secret:<name>``, which master-key rotation re-wraps); it never leaves memory
    unwrapped. Used for the subject lookup key and the keyed exact hashes of banks.

    Raises:
        moderation.crypto.errors.CryptoError: the stored secret does not unwrap under
            ``keyring``.
    """
    row = session.get(DeploymentSecret, name)
    context = _context(name)
    if row is None:
        secret = generate_data_key()
        row = DeploymentSecret(
            name=name, wrapped=wrap_key(secret, keyring, context=context).to_bytes()
        )
        session.add(row)
        session.flush()
        return secret
    return unwrap_key(WrappedKey.from_bytes(row.wrapped), keyring, context=context)


def existing_deployment_secret(session: Session, keyring: KeyRing, name: str) -> bytes | None:
    """The secret ``name`` if it exists, else None (read-only: never creates one).

    Raises:
        moderation.crypto.errors.CryptoError: it does not unwrap under ``keyring``.
    """
    row = session.get(DeploymentSecret, name)
    if row is None:
        return None
    return unwrap_key(
        WrappedKey.from_bytes(row.wrapped), keyring, context=f"deployment-secret:{name}"
    )
