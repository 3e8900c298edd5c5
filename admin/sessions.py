"""Server-side console sessions stored in the ``console_sessions`` table.

The cookie carries only a random token (256 bits); the row is keyed by the token's SHA-256, so a
copy of the table cannot be replayed. Logging out deletes the row, so a copied cookie is useless
afterwards (RELIABILITY.md W2). :meth:`ServerSession.regenerate` issues a new token and deletes
the old row: called after the password and again after the TOTP step (W1, session fixation).
Sessions end after an absolute lifetime and after an idle period.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import CallbackDict

from moderation.governance.review import utc
from moderation.storage.console import ConsoleSession
from moderation.storage.db import transaction

TOKEN_BYTES = 32
"""Session token entropy, bytes (OWASP Session Management: at least 64 bits; we use 256)."""
TOUCH_INTERVAL = timedelta(seconds=60)
"""``last_seen_at`` is written at most this often for an unchanged session."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ServerSession(CallbackDict[str, Any], SessionMixin):
    """The session dict of one request; ``token`` is None until the session is first saved."""

    def __init__(
        self,
        initial: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        last_seen: datetime | None = None,
        inert: bool = False,
    ) -> None:
        def on_update(value: ServerSession) -> None:
            value.modified = True

        super().__init__(initial, on_update)
        self.token = token
        self.last_seen = last_seen
        self.discarded: list[str] = []
        self.inert = inert  # static files: never read or written
        self.modified = False

    def regenerate(self) -> None:
        """Drop the current id: the row is deleted and a new token is issued on save."""
        if self.token is not None:
            self.discarded.append(self.token)
        self.token = None
        self.modified = True

    def destroy(self) -> None:
        """Log out: empty the session and delete its row."""
        self.regenerate()
        self.clear()


class DatabaseSessionInterface(SessionInterface):
    """Flask session interface over ``console_sessions``.

    Args:
        sessions: the database session factory.
        lifetime: absolute session lifetime.
        idle: a session unused this long is ended.
        secure: set the cookie's ``Secure`` flag (and use the ``__Host-`` name prefix).
    """

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        *,
        lifetime: timedelta,
        idle: timedelta,
        secure: bool,
    ) -> None:
        self._sessions = sessions
        self.lifetime = lifetime
        self.idle = idle
        self.secure = secure
        self.cookie_name = "__Host-moderation_session" if secure else "moderation_session"

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        static = app.static_url_path
        if static and request.path.startswith(static + "/"):
            return ServerSession(inert=True)
        token = request.cookies.get(self.cookie_name)
        if not token or len(token) > 128:
            return ServerSession()
        now = datetime.now(UTC)
        with self._sessions()() as db:
            row = db.get(ConsoleSession, _digest(token))
            if row is not None:
                alive = utc(row.expires_at) > now and now - utc(row.last_seen_at) < self.idle
                if alive:
                    return ServerSession(row.data, token=token, last_seen=utc(row.last_seen_at))
        expired = ServerSession()
        expired.discarded.append(token)
        return expired

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ServerSession)
        if session.inert:
            return
        response.vary.add("Cookie")
        now = datetime.now(UTC)
        if not session:
            if session.discarded or session.token:
                self._end(session, response)
        elif session.token is None:
            self._create(session, now, response)
        elif (
            session.modified
            or session.last_seen is None
            or now - session.last_seen > TOUCH_INTERVAL
        ):
            self._touch(session, session.token, now)

    def _end(self, session: ServerSession, response: Response) -> None:
        """Delete the emptied session's rows and its cookie."""
        with transaction(self._sessions()) as db:
            _delete_rows(db, [*session.discarded, *([session.token] if session.token else [])])
        response.delete_cookie(
            self.cookie_name, path="/", secure=self.secure, httponly=True, samesite="Lax"
        )

    def _create(self, session: ServerSession, now: datetime, response: Response) -> None:
        """Store the session under a new token (deleting discarded ones) and set its cookie."""
        data = dict(session)
        user_id = data.get("user_id")
        session.token = secrets.token_urlsafe(TOKEN_BYTES)
        expires = now + self.lifetime
        with transaction(self._sessions()) as db:
            if session.discarded:
                _delete_rows(db, session.discarded)
            db.add(
                ConsoleSession(
                    id=_digest(session.token),
                    user_id=user_id if isinstance(user_id, int) else None,
                    data=data,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires,
                )
            )
        response.set_cookie(
            self.cookie_name,
            session.token,
            expires=expires,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )

    def _touch(self, session: ServerSession, token: str, now: datetime) -> None:
        """Move ``last_seen_at`` to now, and write the data when it changed."""
        values: dict[str, Any] = {"last_seen_at": now}
        if session.modified:
            data = dict(session)
            user_id = data.get("user_id")
            values.update(data=data, user_id=user_id if isinstance(user_id, int) else None)
        with transaction(self._sessions()) as db:
            # A row deleted meanwhile (logout elsewhere, user disabled) stays deleted.
            db.execute(
                update(ConsoleSession).where(ConsoleSession.id == _digest(token)).values(**values)
            )


def _delete_rows(db: Session, tokens: list[str]) -> None:
    db.execute(delete(ConsoleSession).where(ConsoleSession.id.in_([_digest(t) for t in tokens])))


def end_expired_sessions(sessions: sessionmaker[Session], *, idle: timedelta) -> int:
    """Delete rows past their lifetime or idle too long; returns how many."""
    now = datetime.now(UTC)
    with transaction(sessions) as db:
        result = db.execute(
            delete(ConsoleSession).where(
                (ConsoleSession.expires_at < now) | (ConsoleSession.last_seen_at < now - idle)
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
