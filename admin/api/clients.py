"""Bearer-token authentication and per-client rate limiting of the machine APIs.

Every API blueprint (``/api/v1``, the HMA-compatible ``/hma``) authenticates with
:func:`authenticated_client_id` (uploads and other writes) or :func:`authenticated_reader_id`
(reads), each against its own per-client window; each renders :class:`ApiError` in its own JSON
error shape.
"""

from __future__ import annotations

import logging

from flask import request
from sqlalchemy.exc import SQLAlchemyError

from admin.api.services import ClientLimiter, services
from moderation.service.api_clients import authenticate, record_use, use_is_stale
from moderation.storage.db import transaction

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _client_id() -> int:
    from admin import runtime

    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthorized", "a bearer token is required", {"WWW-Authenticate": "Bearer"}
        )
    with runtime().sessions() as session:
        client = authenticate(session, token.strip())
        if client is None:
            raise ApiError(
                401,
                "unauthorized",
                "invalid or revoked token",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        client_id, stale = client.id, use_is_stale(client)
    if stale:
        _note_use(client_id)
    return client_id


def _note_use(client_id: int) -> None:
    """Best effort: a failed ``last_used_at`` write must not refuse the request."""
    from admin import runtime

    try:
        with transaction(runtime().sessions) as session:
            record_use(session, client_id)
    except SQLAlchemyError as exc:
        logger.warning("could not record the use of API client %s: %s", client_id, exc)


def _rate_limit(client_id: int, limiter: ClientLimiter) -> None:
    allowed, retry_after = limiter.hit(str(client_id))
    if not allowed:
        raise ApiError(
            429,
            "rate_limited",
            "too many requests for this client",
            {"Retry-After": str(int(retry_after + 0.999))},
        )


def authenticated_client_id() -> int:
    """The id of the API client whose bearer token the request carries, after counting the
    request against its upload (write) rate limit, ``MODERATION_API_RATE_LIMIT``.

    Raises:
        ApiError: 401 without a valid, unrevoked token; 429 over the client's rate limit.
    """
    client_id = _client_id()
    _rate_limit(client_id, services().limiter)
    return client_id


def authenticated_reader_id() -> int:
    """Like :func:`authenticated_client_id` for a read (a screening's status, a hash lookup):
    counted against the client's read limit, ``MODERATION_API_STATUS_RATE_LIMIT``, a window of
    its own, so polling never uses up the upload budget.

    Raises:
        ApiError: 401 without a valid, unrevoked token; 429 over the client's read limit.
    """
    client_id = _client_id()
    _rate_limit(client_id, services().status_limiter)
    return client_id
