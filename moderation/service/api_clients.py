"""API clients of the upload hook: bearer tokens (stored hashed) and callback secrets (encrypted).

A token is 256 random bits (``secrets.token_urlsafe(32)``) behind the prefix ``mod_``; only its
SHA-256 is stored: with that much entropy a fast hash cannot be brute-forced (the scheme GitHub
and PyPI use for API tokens), so lookups stay one indexed query. The callback secret (32 random
bytes, given to the client as 64 hex characters) is wrapped by the primary master key like any
data key, bound to the client's id, and re-wrapped on key rotation (``moderation.governance.keys``).
Both are shown once, at creation, and again only when rotated.

Lifecycle (README "API clients"): :func:`list_api_clients`, :func:`revoke_api_client` (final),
:func:`rotate_token`, :func:`rotate_callback_secret` and :func:`set_allowlist`, each audited in
the caller's transaction; the CLI (``moderation api-client``) and the console call these. Nothing
about a client is cached per process: :func:`authenticate` reads the row on every request, so a
revocation or rotation committed by any process is in force on the next request everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.service.callback_urls import PRODUCTION, CallbackPolicy, normalise_allowlist_prefix
from moderation.storage.models import ApiClient

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "mod_"  # noqa: S105 - a prefix, not a secret


LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is written at most once a minute per client (one small UPDATE, not one per
request)."""


class ClientError(Exception):
    """An API client operation was refused (duplicate name, bad allowlist prefix, revoked)."""


class UnknownClientError(ClientError):
    """No API client has that id or name."""


@dataclass(frozen=True)
class NewClient:
    """A created client with its credentials (shown once, never stored in clear)."""

    client_id: int
    name: str
    token: str
    callback_secret: str
    callback_allowlist: tuple[str, ...]


def new_token() -> str:
    """A fresh bearer token: ``mod_`` + 256 random bits, URL-safe base64 (47 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _normalised_allowlist(prefixes: Sequence[str], policy: CallbackPolicy) -> tuple[str, ...]:
    """The prefixes validated against ``policy`` and trimmed
    (:func:`normalise_allowlist_prefix`), duplicates dropped, in the given order.

    Raises:
        ClientError: an invalid prefix.
    """
    try:
        return tuple(
            dict.fromkeys(normalise_allowlist_prefix(p, policy) for p in prefixes if p.strip())
        )
    except ValueError as exc:
        raise ClientError(str(exc)) from exc


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
    origin: str | None = None,
    policy: CallbackPolicy = PRODUCTION,
) -> NewClient:
    """Create an API client in the caller's transaction (with its audit event).

    Args:
        callback_allowlist: URL prefixes callbacks may go to, e.g. ``https://hooks.example/``
            (scheme, host and port must match exactly; the path is a prefix).
        policy: the deployment's callback policy (``callback_policy(settings)``): https, and
            no loopback, private or metadata host, unless it allows them.

    Raises:
        ClientError: empty or taken name, or an invalid allowlist prefix.
    """
    if not name.strip():
        raise ClientError("client name must not be empty")
    if session.scalar(select(ApiClient).where(ApiClient.name == name)) is not None:
        raise ClientError(f"an API client named {name!r} already exists")
    allowlist = _normalised_allowlist(callback_allowlist, policy)
    token = new_token()
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
        origin=origin,
        details={"name": name, "callback_allowlist": list(allowlist)},
    )
    return NewClient(client.id, name, token, raw_secret.hex(), allowlist)


def authenticate(session: Session, token: str) -> ApiClient | None:
    """The enabled, unrevoked client owning ``token``, or None (read from the database on every
    call: no cache, so revocations and rotations apply at once in every process)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    client = session.scalar(select(ApiClient).where(ApiClient.token_hash == hash_token(token)))
    if client is None or client.disabled or client.revoked_at is not None:
        return None
    return client


def use_is_stale(client: ApiClient, now: datetime | None = None) -> bool:
    """True when ``client.last_used_at`` is unset or older than :data:`LAST_USED_RESOLUTION`."""
    if client.last_used_at is None:
        return True
    now = now or datetime.now(UTC)
    return _aware(client.last_used_at) < now - LAST_USED_RESOLUTION


def record_use(session: Session, client_id: int, now: datetime | None = None) -> bool:
    """Set the client's ``last_used_at`` to ``now`` unless another process already did within
    :data:`LAST_USED_RESOLUTION` (one conditional UPDATE); True when it was written."""
    now = now or datetime.now(UTC)
    result = session.execute(
        update(ApiClient)
        .where(
            ApiClient.id == client_id,
            or_(
                ApiClient.last_used_at.is_(None),
                ApiClient.last_used_at < now - LAST_USED_RESOLUTION,
            ),
        )
        .values(last_used_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def callback_secret(client: ApiClient, keyring: KeyRing) -> str:
    """The client's callback signing secret (64 hex characters; the HMAC key is its ASCII).

    Raises:
        moderation.crypto.errors.UnknownKeyError, moderation.crypto.errors.DecryptionError: as
            ``unwrap_key``.
    """
    wrapped = WrappedKey.from_bytes(client.callback_secret)
    return unwrap_key(wrapped, keyring, context=secret_context(client.id)).hex()


# --- lifecycle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientInfo:
    """One client as listings show it (no credentials; times are aware UTC or None)."""

    client_id: int
    name: str
    state: str  # "active", "disabled" or "revoked"
    created_at: datetime
    callback_allowlist: tuple[str, ...]
    last_used_at: datetime | None
    revoked_at: datetime | None
    token_rotated_at: datetime | None
    secret_rotated_at: datetime | None

    def as_row(self) -> dict[str, object]:
        """JSON-ready: times as ISO 8601 strings, the allowlist as a list."""
        row: dict[str, object] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            row[key] = value
        return row


def _info(client: ApiClient) -> ClientInfo:
    def aware(value: datetime | None) -> datetime | None:
        return None if value is None else _aware(value)

    state = (
        "revoked" if client.revoked_at is not None else "disabled" if client.disabled else "active"
    )
    return ClientInfo(
        client_id=client.id,
        name=client.name,
        state=state,
        created_at=_aware(client.created_at),
        callback_allowlist=tuple(client.callback_allowlist or ()),
        last_used_at=aware(client.last_used_at),
        revoked_at=aware(client.revoked_at),
        token_rotated_at=aware(client.token_rotated_at),
        secret_rotated_at=aware(client.secret_rotated_at),
    )


def list_api_clients(session: Session) -> list[ClientInfo]:
    """Every client, revoked ones included, by id."""
    return [_info(c) for c in session.scalars(select(ApiClient).order_by(ApiClient.id))]


def find_client(session: Session, ref: int | str, *, for_update: bool = False) -> ApiClient:
    """The client with id ``ref`` (an int), or named ``ref`` (a str; a str of digits that names
    no client is taken as an id).

    Raises:
        UnknownClientError: no such client.
    """
    client_id: int | None = ref if isinstance(ref, int) else None
    if isinstance(ref, str):
        client_id = session.scalar(select(ApiClient.id).where(ApiClient.name == ref))
        if client_id is None and ref.isdigit():
            client_id = int(ref)
    client = (
        None
        if client_id is None
        else session.get(ApiClient, client_id, with_for_update=True if for_update else None)
    )
    if client is None:
        raise UnknownClientError(f"no API client {ref!r}")
    return client


def _live_client(session: Session, ref: int | str) -> ApiClient:
    """The client, row-locked; refused when revoked (revocation is final)."""
    client = find_client(session, ref, for_update=True)
    if client.revoked_at is not None:
        raise ClientError(f"API client {client.name!r} is revoked; create a new one")
    return client


def _audit(
    session: Session,
    client: ApiClient,
    action: str,
    actor: str,
    origin: str | None,
    **details: object,
) -> None:
    record_event(
        session,
        actor=actor,
        action=f"api_client.{action}",
        target=f"client:{client.id}",
        origin=origin,
        details={"name": client.name, **details},
    )


def revoke_api_client(
    session: Session, ref: int | str, *, actor: str, origin: str | None = None
) -> ClientInfo:
    """Revoke a client for good, in the caller's transaction (audited ``api_client.revoke``):
    its token is refused from the commit on, by every process; its pending callbacks are
    refused at delivery (``client_gone``).

    Raises:
        UnknownClientError: no such client. ClientError: already revoked.
    """
    client = _live_client(session, ref)
    client.disabled = True
    client.revoked_at = datetime.now(UTC)
    _audit(session, client, "revoke", actor, origin)
    return _info(client)


def rotate_token(session: Session, ref: int | str, *, actor: str, origin: str | None = None) -> str:
    """Give the client a new bearer token (returned once, stored hashed); the old one is
    refused from the commit on. Audited ``api_client.rotate_token``.

    Raises:
        UnknownClientError: no such client. ClientError: revoked.
    """
    client = _live_client(session, ref)
    token = new_token()
    client.token_hash = hash_token(token)
    client.token_rotated_at = datetime.now(UTC)
    _audit(session, client, "rotate_token", actor, origin)
    return token


def rotate_callback_secret(
    session: Session, keyring: KeyRing, ref: int | str, *, actor: str, origin: str | None = None
) -> str:
    """Give the client a new callback secret (64 hex characters, returned once, stored wrapped
    by the primary master key); every callback sent after the commit, retries of older
    decisions included, is signed with it. Audited ``api_client.rotate_callback_secret``.

    Raises:
        UnknownClientError: no such client. ClientError: revoked.
    """
    client = _live_client(session, ref)
    raw_secret = generate_data_key()
    client.callback_secret = wrap_key(
        raw_secret, keyring, context=secret_context(client.id)
    ).to_bytes()
    client.secret_rotated_at = datetime.now(UTC)
    _audit(session, client, "rotate_callback_secret", actor, origin)
    return raw_secret.hex()


def set_allowlist(
    session: Session,
    ref: int | str,
    prefixes: Sequence[str],
    *,
    actor: str,
    origin: str | None = None,
    policy: CallbackPolicy = PRODUCTION,
) -> tuple[str, ...]:
    """Replace the client's callback allowlist (validated against ``policy`` as at creation);
    callbacks already queued are re-checked against the new list at delivery. Audited
    ``api_client.set_allowlist`` with the lists before and after.

    Raises:
        UnknownClientError: no such client. ClientError: revoked, or an invalid prefix.
    """
    allowlist = _normalised_allowlist(prefixes, policy)
    client = _live_client(session, ref)
    before = list(client.callback_allowlist or ())
    client.callback_allowlist = list(allowlist)
    _audit(session, client, "set_allowlist", actor, origin, before=before, after=list(allowlist))
    return allowlist
