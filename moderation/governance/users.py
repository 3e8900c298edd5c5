"""Console users and roles: argon2id passwords, TOTP second factor with reuse rejection.

Roles: ``admin`` (banks, users, approvals), ``reviewer`` (the review queue), ``auditor`` (read
the record), ``dpo`` (data-subject erasure). ``admin`` and ``dpo`` must use TOTP; the others may.

Passwords are hashed with argon2id (RFC 9106) at the RFC's "second recommended option"
parameters (t=3, m=64 MiB, p=4; argon2-cffi's ``profiles.RFC_9106_LOW_MEMORY``), above OWASP's
minimum of m=19 MiB, t=2. TOTP follows RFC 6238 (HMAC-SHA1, 6 digits, 30 s steps) via pyotp; the
last accepted time step is stored so a code is accepted once (RFC 6238 §5.2). The TOTP secret is
32 random bytes kept wrapped by a master key (AES-256-GCM, :mod:`moderation.crypto`), never in
plaintext in the database.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.crypto.envelope import WrappedKey, unwrap_key, wrap_key
from moderation.crypto.keys import KeyRing
from moderation.storage.console import ConsoleSession
from moderation.storage.models import User

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("admin", "reviewer", "auditor", "dpo")
TOTP_REQUIRED_ROLES: frozenset[str] = frozenset({"admin", "dpo"})

MIN_PASSWORD_LENGTH = 8
"""NIST SP 800-63B §5.1.1.2: user-chosen memorized secrets are at least 8 characters."""
MAX_PASSWORD_LENGTH = 1024
"""Upper bound so a huge password cannot make hashing a denial of service."""

TOTP_ISSUER = "moderation"
TOTP_DIGITS = 6
TOTP_INTERVAL = 30
"""RFC 6238 §4 defaults: 6 digits, 30-second time step."""
TOTP_VALID_WINDOW = 1
"""Steps of clock drift accepted either side of now (RFC 6238 §5.2 recommends at most one)."""
TOTP_SECRET_BYTES = 32
"""Random TOTP key length, bytes (RFC 4226 §4 asks for at least 16; 32 is also the size
:func:`moderation.crypto.envelope.wrap_key` wraps)."""

_HASHER = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
# Verified against when the e-mail is unknown, so a miss costs as much time as a wrong password.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
_EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


class UserError(Exception):
    """A user operation was refused (bad e-mail, role or password, duplicate, unknown user)."""


@dataclass(frozen=True)
class CreatedUser:
    """A new user and, when TOTP was set up, its ``otpauth://`` provisioning URI (shown once)."""

    user_id: int
    email: str
    role: str
    totp_uri: str | None


def hash_password(password: str) -> str:
    """argon2id PHC string of ``password`` (``$argon2id$v=19$m=65536,t=3,p=4$...``).

    Raises:
        UserError: shorter than :data:`MIN_PASSWORD_LENGTH` or longer than
            :data:`MAX_PASSWORD_LENGTH` characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def normalise_email(email: str) -> str:
    """Trimmed, lower-cased e-mail address.

    Raises:
        UserError: not of the form ``local@domain``.
    """
    value = email.strip().lower()
    if not _EMAIL_RE.fullmatch(value):
        raise UserError("not an e-mail address")
    return value


def totp_context(user_id: int) -> str:
    """The wrap context of a user's TOTP secret (binds the wrapped key to its user)."""
    return f"user-totp:{user_id}"


def _totp(secret: bytes) -> pyotp.TOTP:
    encoded = base64.b32encode(secret).decode("ascii").rstrip("=")
    return pyotp.TOTP(encoded, digits=TOTP_DIGITS, interval=TOTP_INTERVAL)


def _secret_of(user: User, keyring: KeyRing) -> bytes:
    assert user.totp_secret is not None
    return unwrap_key(
        WrappedKey.from_bytes(user.totp_secret), keyring, context=totp_context(user.id)
    )


def enrol_totp(session: Session, keyring: KeyRing, user: User, *, actor: str) -> str:
    """Give ``user`` a new TOTP secret (replacing any old one) and return its provisioning URI.

    Raises:
        moderation.crypto.errors.CryptoError: the key ring cannot wrap (no primary key).
    """
    secret = secrets.token_bytes(TOTP_SECRET_BYTES)
    user.totp_secret = wrap_key(secret, keyring, context=totp_context(user.id)).to_bytes()
    user.totp_last_counter = None
    record_event(session, actor=actor, action="user.totp_enrol", target=f"user:{user.id}")
    uri: str = _totp(secret).provisioning_uri(name=user.email, issuer_name=TOTP_ISSUER)
    return uri


def create_user(
    session: Session,
    keyring: KeyRing,
    *,
    email: str,
    role: str,
    password: str,
    totp: bool | None = None,
    actor: str,
) -> CreatedUser:
    """Add a user (audited as ``user.create``); ``totp=None`` enrols TOTP only where required.

    Raises:
        UserError: bad e-mail, unknown role, bad password, e-mail taken, or ``totp=False`` for a
            role that requires TOTP.
    """
    address = normalise_email(email)
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    want_totp = role in TOTP_REQUIRED_ROLES if totp is None else totp
    if role in TOTP_REQUIRED_ROLES and not want_totp:
        raise UserError(f"role {role} requires TOTP")
    if session.scalar(select(User.id).where(User.email == address)) is not None:
        raise UserError("a user with that e-mail already exists")
    user = User(email=address, role=role, password_hash=hash_password(password), disabled=False)
    session.add(user)
    session.flush()
    record_event(
        session,
        actor=actor,
        action="user.create",
        target=f"user:{user.id}",
        details={"role": role, "totp": want_totp},
    )
    uri = enrol_totp(session, keyring, user, actor=actor) if want_totp else None
    return CreatedUser(user_id=user.id, email=address, role=role, totp_uri=uri)


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The enabled user with this e-mail and password, or None (the caller audits the outcome).

    Takes about the same time whether or not the e-mail exists. Re-hashes the password when the
    stored hash uses weaker parameters than :data:`_HASHER`.
    """
    try:
        address = normalise_email(email)
    except UserError:
        address = ""
    user = session.scalar(select(User).where(User.email == address)) if address else None
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _HASHER.verify(stored, password[:MAX_PASSWORD_LENGTH])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    return user


def verify_password(user: User, password: str) -> bool:
    """True when ``password`` is the user's (step-up re-authentication)."""
    try:
        return _HASHER.verify(user.password_hash, password[:MAX_PASSWORD_LENGTH])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def has_totp(user: User) -> bool:
    """True when the user has a TOTP secret."""
    return user.totp_secret is not None


def totp_required(user: User) -> bool:
    """True when the user's role demands TOTP."""
    return user.role in TOTP_REQUIRED_ROLES


def verify_totp(
    session: Session, keyring: KeyRing, user_id: int, code: str, *, at: datetime | None = None
) -> bool:
    """Check a TOTP code and consume its time step: each step's code is accepted once.

    Codes from one step either side of ``at`` (default now) are accepted (clock drift); a code
    whose step is not newer than the last accepted one is rejected (replay). The user row is
    locked (``SELECT ... FOR UPDATE`` on PostgreSQL) so two requests cannot both use one code.
    """
    user = session.get(User, user_id, with_for_update=True)
    if user is None or user.disabled or user.totp_secret is None:
        return False
    candidate = code.strip().replace(" ", "")
    if len(candidate) != TOTP_DIGITS or not candidate.isdigit():
        return False
    totp = _totp(_secret_of(user, keyring))
    now_step = totp.timecode(at or datetime.now(UTC))
    for step in range(now_step - TOTP_VALID_WINDOW, now_step + TOTP_VALID_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), candidate):
            if user.totp_last_counter is not None and step <= user.totp_last_counter:
                logger.info("TOTP code for user %d rejected: time step already used", user.id)
                return False
            user.totp_last_counter = step
            session.flush()
            return True
    return False


def totp_code(keyring: KeyRing, user: User, *, at: datetime | None = None) -> str:
    """The current TOTP code of ``user`` (for tests and the CLI's set-up check)."""
    return str(_totp(_secret_of(user, keyring)).at(at or datetime.now(UTC)))


def set_disabled(session: Session, user_id: int, *, disabled: bool, actor: str) -> User:
    """Disable (ending every session of the user) or re-enable a user; audited.

    Raises:
        UserError: no such user.
    """
    user = session.get(User, user_id)
    if user is None:
        raise UserError(f"no user {user_id}")
    user.disabled = disabled
    if disabled:
        session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user_id))
    record_event(
        session,
        actor=actor,
        action="user.disable" if disabled else "user.enable",
        target=f"user:{user_id}",
    )
    return user


def get_user_by_email(session: Session, email: str) -> User | None:
    """The user with this e-mail, or None."""
    try:
        address = normalise_email(email)
    except UserError:
        return None
    return session.scalar(select(User).where(User.email == address))


def list_users(session: Session) -> list[User]:
    """Every user, by e-mail."""
    return list(session.scalars(select(User).order_by(User.email)))


def _user_for_change(session: Session, user_id: int) -> User:
    user = session.get(User, user_id, with_for_update=True)
    if user is None:
        raise UserError(f"no user {user_id}")
    return user


def _end_sessions(session: Session, user_id: int) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user_id))


def set_role(
    session: Session, user_id: int, role: str, *, actor: str, origin: str | None = None
) -> User:
    """Change a user's role (audited ``user.role``, old and new role); their console sessions
    end, so the new permissions apply at once.

    Raises:
        UserError: no such user, unknown role, or a role requiring TOTP for a user without it
            (reset their TOTP first: :func:`reset_totp`).
    """
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = _user_for_change(session, user_id)
    if role in TOTP_REQUIRED_ROLES and not has_totp(user):
        raise UserError(f"role {role} requires TOTP: reset the user's TOTP first")
    previous, user.role = user.role, role
    _end_sessions(session, user_id)
    record_event(
        session,
        actor=actor,
        action="user.role",
        target=f"user:{user_id}",
        origin=origin,
        details={"from": previous, "to": role},
    )
    return user


def reset_password(
    session: Session, user_id: int, password: str, *, actor: str, origin: str | None = None
) -> User:
    """Set a new password for a user (audited ``user.password_reset``; the password is never
    logged) and end their console sessions.

    Raises:
        UserError: no such user, or the password is too short or too long.
    """
    user = _user_for_change(session, user_id)
    user.password_hash = hash_password(password)
    _end_sessions(session, user_id)
    record_event(
        session, actor=actor, action="user.password_reset", target=f"user:{user_id}", origin=origin
    )
    return user


def reset_totp(
    session: Session, keyring: KeyRing, user_id: int, *, actor: str, origin: str | None = None
) -> str:
    """Replace a user's TOTP secret (a lost authenticator; audited ``user.totp_reset`` then
    ``user.totp_enrol``), end their console sessions; returns the new provisioning URI (show it
    once, to the user only).

    Raises:
        UserError: no such user.
        moderation.crypto.errors.CryptoError: the key ring cannot wrap.
    """
    user = _user_for_change(session, user_id)
    record_event(
        session, actor=actor, action="user.totp_reset", target=f"user:{user_id}", origin=origin
    )
    _end_sessions(session, user_id)
    return enrol_totp(session, keyring, user, actor=actor)
