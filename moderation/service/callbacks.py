"""Signed callbacks to the platforms' URLs: mark for delivery, deliver, retry with backoff.

Flow: a decision (a worker's result, or a reviewer's) calls :func:`notify_decision` inside its
own transaction; that adds a ``callback_deliveries`` row holding the exact JSON body and, after
the commit, sends ``moderation.deliver_callback`` through the session's dispatcher
(``moderation.service.dispatch``). :func:`deliver_callback` makes one attempt: it re-checks the URL
against the client's allowlist and the deployment's policy (``callback_urls``), POSTs the body
signed with the client's secret over a connection to a checked address only
(``callback_http``: a host resolving to a private, loopback or metadata address is refused at
connect time), logs the attempt in ``callback_attempts`` and either finishes the delivery (one
audit event per outcome: delivered, failed, refused) or schedules the next attempt with
exponential backoff. Deliveries
are at-least-once: a receiver deduplicates on ``delivery_id`` (also in the
``X-Moderation-Delivery`` header).

Signature (ARCHITECTURE.md): ``X-Moderation-Signature: t=<unix seconds>,v1=<hex>`` where hex is
HMAC-SHA256 keyed with the client's callback secret (its ASCII bytes) over ``t + "." + body``:
the scheme of Stripe's webhook signatures (the timestamp in the signed string stops replays of
old bodies).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation import __version__
from moderation.audit.log import record_event
from moderation.service.api_clients import callback_secret
from moderation.service.callback_http import ForbiddenAddressError, guarded_session
from moderation.service.callback_urls import CallbackPolicy, callback_policy, url_allowed
from moderation.service.dispatch import send_after_commit, session_dispatcher
from moderation.service.metrics import CALLBACK_ATTEMPTS
from moderation.service.results import upload_view, with_labels
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, CallbackAttempt, CallbackDelivery, Upload

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Moderation-Signature"
DELIVERY_HEADER = "X-Moderation-Delivery"
DEFAULT_TOLERANCE_S = 300  # a signature older than 5 min is refused (Stripe's default tolerance)
MAX_BACKOFF_S = 3600.0


# --- signatures -------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Moderation-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode("ascii"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``header`` is a valid signature of ``body`` made within ``tolerance_s``.

    Accepts several ``v1=`` values (a sender may sign with two secrets during a change).
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, c) for c in candidates)


def backoff_seconds(attempt: int, base: float) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)``, at most one hour."""
    return float(min(base * 2 ** max(0, attempt - 1), MAX_BACKOFF_S))


# --- marking a decision for delivery -----------------------------------------------------------


def notify_decision(session: Session, upload_id: str, *, event: str | None = None) -> None:
    """Mark the upload's current decision for delivery to its client's callback URL.

    ``event`` names it in the body (``appeal.decided``...); by default ``review.decided`` once
    a reviewer has decided, else ``screening.decided``.

    Runs inside the caller's transaction: the delivery row commits (or rolls back) with the
    decision, and the delivery task is sent only after the commit (by the session's dispatcher;
    without one, or if that send is lost, the reconciler sends it). A no-op when the upload has
    no callback URL or no client.
    """
    upload = session.get(Upload, upload_id)
    if upload is None or not upload.callback_url or upload.client_id is None:
        return
    delivery = CallbackDelivery(
        upload_id=upload.id,
        client_id=upload.client_id,
        url=upload.callback_url,
        payload={},
        state="pending",
        attempts=0,
        next_attempt_at=datetime.now(UTC),
    )
    session.add(delivery)
    session.flush()
    delivery.payload = {
        "delivery_id": delivery.id,
        "event": "screening.decided",
        **upload_view(session, upload, None),  # labels stay sealed: added when sent
    }
    if event is not None:
        delivery.payload["event"] = event
    elif "review" in delivery.payload:
        delivery.payload["event"] = "review.decided"
    session.flush()
    dispatcher = session_dispatcher(session)
    if dispatcher is not None:
        delivery_id = delivery.id
        send_after_commit(session, lambda: dispatcher.send_callback(delivery_id))


# --- delivering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one call of :func:`deliver_callback` did.

    ``state``: delivered | retry | failed | refused | skipped (already finished or gone) |
    not_due (another attempt holds it or its backoff has not passed). ``retry_in`` (s) is set
    for ``retry``.
    """

    state: str
    attempt: int = 0
    status_code: int | None = None
    retry_in: float | None = None


def _body(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _finish(
    session: Session,
    delivery: CallbackDelivery,
    *,
    state: str,
    outcome: str,
    now: datetime,
    details: dict[str, Any],
) -> None:
    delivery.state = state
    delivery.finished_at = now
    record_event(
        session,
        actor="worker",
        action="callback.deliver",
        target=f"upload:{delivery.upload_id}",
        outcome=outcome,
        details={"delivery_id": delivery.id, "client_id": delivery.client_id, **details},
    )


def _refuse(
    session: Session,
    delivery: CallbackDelivery,
    *,
    now: datetime,
    reason: str,
    attempt: int | None = None,
    error: str | None = None,
) -> DeliveryOutcome:
    """Finish the delivery refused (audited ``denied``); with ``error``, log the refused
    attempt ``attempt`` (default: the next one) first."""
    if error is not None:
        session.add(
            CallbackAttempt(
                upload_id=delivery.upload_id,
                delivery_id=delivery.id,
                url=delivery.url[:2000],
                attempt=attempt if attempt is not None else delivery.attempts + 1,
                error=error[:500],
                delivered=False,
            )
        )
        logger.warning("callback %s %s", delivery.id, error)
    _finish(
        session, delivery, state="failed", outcome="denied", now=now, details={"reason": reason}
    )
    CALLBACK_ATTEMPTS.labels("refused").inc()
    return DeliveryOutcome("refused")


@dataclass(frozen=True)
class _Claim:
    """One attempt claimed on a pending delivery: what to POST, and with which secret."""

    attempt: int
    url: str
    upload_id: str
    body: bytes
    secret: str


def _claim(runtime: Runtime, delivery_id: str) -> _Claim | DeliveryOutcome:
    """Claim the next attempt of ``delivery_id`` (committed before sending), or the outcome
    when there is nothing to send: finished, not yet due, or refused."""
    now = datetime.now(UTC)
    settings = runtime.settings
    with transaction(runtime.sessions) as session:
        delivery = session.get(CallbackDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.state != "pending":
            return DeliveryOutcome("skipped")
        due_in = (_utc(delivery.next_attempt_at) - now).total_seconds()
        if due_in > 1.0:
            return DeliveryOutcome("not_due", attempt=delivery.attempts, retry_in=due_in)
        client = session.get(ApiClient, delivery.client_id) if delivery.client_id else None
        if client is None or client.disabled:
            return _refuse(session, delivery, now=now, reason="client_gone")
        if not url_allowed(delivery.url, client.callback_allowlist, callback_policy(settings)):
            return _refuse(
                session,
                delivery,
                now=now,
                reason="not_on_allowlist",
                error="refused: URL not on the client's callback allowlist or against the "
                "callback policy",
            )
        delivery.attempts += 1
        delivery.next_attempt_at = now + timedelta(seconds=settings.callback_timeout * 2 + 30)
        from moderation.crypto.errors import UnknownKeyError

        try:
            secret = callback_secret(client, runtime.keyring)
        except UnknownKeyError:
            # Rotated since this process read the key ring: re-read it once.
            runtime.reload_keyring()
            secret = callback_secret(client, runtime.keyring)
        return _Claim(
            delivery.attempts,
            delivery.url,
            delivery.upload_id,
            _body(with_labels(session, runtime.keyring, delivery.payload)),
            secret,
        )


def _post(
    claim: _Claim, delivery_id: str, *, timeout: float, policy: CallbackPolicy
) -> tuple[int | None, str | None]:
    """POST the signed body once; returns (HTTP status or None, error or None when delivered).

    Raises:
        ForbiddenAddressError: the host resolved to an address ``policy`` refuses (not sent).
    """
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(claim.secret, timestamp, claim.body),
        DELIVERY_HEADER: delivery_id,
        "User-Agent": f"moderation-callbacks/{__version__}",
    }
    status_code: int | None = None
    error: str | None = None
    try:
        with guarded_session(policy) as http:
            # No redirects: a 3xx to another host would step around the allowlist.
            response = http.post(
                claim.url,
                data=claim.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    return status_code, error


def _refuse_claimed(
    runtime: Runtime, delivery_id: str, claim: _Claim, exc: ForbiddenAddressError
) -> DeliveryOutcome:
    """Finish a claimed delivery whose host resolved to a refused address (RELIABILITY.md S5):
    no retry, since the next answer of an attacker's resolver could be refused again or not."""
    with transaction(runtime.sessions) as session:
        delivery = session.get(CallbackDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.state != "pending":
            return DeliveryOutcome("skipped", attempt=claim.attempt)
        return _refuse(
            session,
            delivery,
            now=datetime.now(UTC),
            reason="forbidden_address",
            attempt=claim.attempt,
            error=f"refused: {exc}",
        )


def _settle(
    runtime: Runtime,
    delivery_id: str,
    claim: _Claim,
    status_code: int | None,
    error: str | None,
) -> DeliveryOutcome:
    """Log the attempt, then finish the delivery or schedule its next attempt."""
    settings = runtime.settings
    attempt = claim.attempt
    delivered = error is None
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        delivery = session.get(CallbackDelivery, delivery_id, with_for_update=True)
        session.add(
            CallbackAttempt(
                upload_id=claim.upload_id,
                delivery_id=delivery_id,
                url=claim.url[:2000],
                attempt=attempt,
                status_code=status_code,
                error=error,
                delivered=delivered,
            )
        )
        if delivery is None or delivery.state != "pending":
            return DeliveryOutcome("skipped", attempt=attempt, status_code=status_code)
        if delivered:
            _finish(
                session,
                delivery,
                state="delivered",
                outcome="success",
                now=now,
                details={"attempts": attempt, "status_code": status_code},
            )
            CALLBACK_ATTEMPTS.labels("delivered").inc()
            return DeliveryOutcome("delivered", attempt=attempt, status_code=status_code)
        if attempt >= settings.callback_max_attempts:
            _finish(
                session,
                delivery,
                state="failed",
                outcome="failure",
                now=now,
                details={"attempts": attempt, "last_error": error},
            )
            CALLBACK_ATTEMPTS.labels("failed").inc()
            logger.warning("callback %s failed after %d attempts: %s", delivery_id, attempt, error)
            return DeliveryOutcome("failed", attempt=attempt, status_code=status_code)
        delay = backoff_seconds(attempt, settings.callback_backoff)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    CALLBACK_ATTEMPTS.labels("retry").inc()
    logger.info(
        "callback %s attempt %d failed (%s); retry in %.0f s", delivery_id, attempt, error, delay
    )
    return DeliveryOutcome("retry", attempt=attempt, status_code=status_code, retry_in=delay)


def deliver_callback(runtime: Runtime, delivery_id: str) -> DeliveryOutcome:
    """Make one delivery attempt of a pending callback (see the module docstring).

    Redelivered tasks have no duplicate side effects: a finished delivery is skipped, and an
    attempt claims the row (its next attempt time moves past the HTTP timeout) before sending,
    so two copies of the task never POST at once.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable (the task retries).
    """
    claim = _claim(runtime, delivery_id)
    if isinstance(claim, DeliveryOutcome):
        return claim
    settings = runtime.settings
    try:
        status_code, error = _post(
            claim, delivery_id, timeout=settings.callback_timeout, policy=callback_policy(settings)
        )
    except ForbiddenAddressError as exc:
        return _refuse_claimed(runtime, delivery_id, claim, exc)
    return _settle(runtime, delivery_id, claim, status_code, error)


def overdue_deliveries(session: Session, *, older_than: datetime, limit: int = 500) -> list[str]:
    """Ids of pending deliveries whose next attempt was due before ``older_than``."""
    return list(
        session.scalars(
            select(CallbackDelivery.id)
            .where(CallbackDelivery.state == "pending")
            .where(CallbackDelivery.next_attempt_at < older_than)
            .order_by(CallbackDelivery.next_attempt_at)
            .limit(limit)
        )
    )
