"""API clients of the upload hook: bearer tokens (stored hashed) and callback secrets (encrypted).

A token is 256 random bits (``secrets.token_urlsafe(32)``) behind the prefix ``mod_``; only its
SHA-256 is stored: with that much entropy a fast hash cannot be brute-forced (the scheme GitHub
and PyPI use for API tokens), so lookups stay one indexed query. The callback secret (32 random
bytes, given to the client as 64 hex characters) is wrapped by the primary master key like any
data key, bound to the client's id, and re-wrapped on key rotation (``moderation.governance.keys``).
Both are shown once, at creation.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.service.callback_urls import normalise_allowlist_prefix
from moderation.storage.models import ApiClient

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "mod_"  # noqa: S105 - a prefix, not a secret


class ClientError(Exception):
    """An API client operation was refused (duplicate name, bad allowlist prefix)."""


@dataclass(frozen=True)
class NewClient:
    """A created client with its credentials (shown once, never stored in clear)."""

    client_id: int
    name: str
    token: str
    callback_secret: str
    callback_allowlist: tuple[str, ...]


def hash_token(token: str) -> str:
    """SHA-256 hex of a bearer token (what the ``api_clients`` row stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def secret_context(client_id: int) -> str:
    """The wrap context binding a callback secret to its client (for re-wrapping too)."""
    return f"api-client:{client_id}:callback-secret"


def create_api_client(
    session: Session,
    keyring: KeyRing,
    name: str,
    *,
    callback_allowlist: Sequence[str] = (),
    actor: str = "cli",
) -> NewClient:
    """Create an API client in the caller's transaction (with its audit event).

    Args:
        callback_allowlist: URL prefixes callbacks may go to, e.g. ``https://hooks.example/``
            (scheme, host and port must match exactly; the path is a prefix).

    Raises:
        ClientError: empty or taken name, or an invalid allowlist prefix.
    """
    if not name.strip():
        raise ClientError("client name must not be empty")
    if session.scalar(select(ApiClient).where(ApiClient.name == name)) is not None:
        raise ClientError(f"an API client named {name!r} already exists")
    try:
        allowlist = tuple(normalise_allowlist_prefix(p) for p in callback_allowlist)
    except ValueError as exc:
        raise ClientError(str(exc)) from exc
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    raw_secret = generate_data_key()
    client = ApiClient(
        name=name,
        token_hash=hash_token(token),
        callback_secret=b"",
        callback_allowlist=list(allowlist),
    )
    session.add(client)
    session.flush()  # the id binds the wrapped secret
    client.callback_secret = wrap_key(
        raw_secret, keyring, context=secret_context(client.id)
    ).to_bytes()
    record_event(
        session,
        actor=actor,
        action="api_client.create",
        target=f"client:{client.id}",
        details={"name": name, "callback_allowlist": list(allowlist)},
    )
    return NewClient(client.id, name, token, raw_secret.hex(), allowlist)


def authenticate(session: Session, token: str) -> ApiClient | None:
    """The enabled client owning ``token``, or None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    client = session.scalar(select(ApiClient).where(ApiClient.token_hash == hash_token(token)))
    if client is None or client.disabled:
        return None
    return client


def callback_secret(client: ApiClient, keyring: KeyRing) -> str:
    """The client's callback signing secret (64 hex characters; the HMAC key is its ASCII).

    Raises:
        moderation.crypto.errors.UnknownKeyError, moderation.crypto.errors.DecryptionError: as
            ``unwrap_key``.
    """
    wrapped = WrappedKey.from_bytes(client.callback_secret)
    return unwrap_key(wrapped, keyring, context=secret_context(client.id)).hex()
