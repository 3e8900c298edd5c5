"""Reviewers scoped to one API client (tenant isolation, issue 14).

A reviewer with ``users.client_id`` set claims, and sees queue figures of, only that client's
review items (:func:`moderation.governance.review.reviewer_client`); others work every
client's. Setting or clearing the scope is audited (``user.set_client``).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.tenancy import client_named
from moderation.governance.review import ReviewError
from moderation.storage.models import ApiClient, User


def set_reviewer_client(
    session: Session, email: str, client_name: str | None, *, actor: str
) -> User:
    """Scope the user ``email`` to API client ``client_name`` (None: every client).

    Raises:
        ReviewError: no such user.
        moderation.banks.records.BlocklistError: no such client.
    """
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        raise ReviewError(f"no user {email!r}")
    client = client_named(session, client_name) if client_name is not None else None
    user.client_id = None if client is None else client.id
    record_event(
        session,
        actor=actor,
        action="user.set_client",
        target=f"user:{user.id}",
        details={"email": email, "client": client_name},
    )
    return user


def client_choices(session: Session) -> list[tuple[int, str]]:
    """Every API client as (id, name), by name, for the console's queue filter."""
    return [(c.id, c.name) for c in session.scalars(select(ApiClient).order_by(ApiClient.name))]
