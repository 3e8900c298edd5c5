"""Who may do what: permissions by role, declared on every view, and step-up checks.

Each view carries exactly one declaration: :func:`public`, or :func:`permission_required`
naming a key of :data:`PERMISSIONS`. The permission-matrix test reads ``view.permission``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import abort, current_app, flash, g, redirect, request, session, url_for
from werkzeug.exceptions import HTTPException

from admin import runtime

F = TypeVar("F", bound=Callable[..., Any])

PERMISSIONS: dict[str, frozenset[str]] = {
    "account": frozenset({"admin", "reviewer", "auditor", "dpo"}),
    "review": frozenset({"admin", "reviewer"}),
    "review.escalated": frozenset({"admin"}),
    "banks.read": frozenset({"admin", "auditor"}),
    "banks.write": frozenset({"admin"}),
    "users": frozenset({"admin"}),
    "api_clients": frozenset({"admin"}),
    "dashboard": frozenset({"admin", "auditor", "dpo"}),
    "audit": frozenset({"admin", "auditor"}),
    "gdpr": frozenset({"dpo"}),
    "holds": frozenset({"admin", "dpo"}),
}
"""Permission -> roles holding it. Separation of duties: only the DPO erases data subjects;
only admins change banks and users; auditors read."""

HOME_BY_ROLE: dict[str, str] = {
    "admin": "dashboard.index",
    "reviewer": "review.queue",
    "auditor": "audit.index",
    "dpo": "gdpr.index",
}


@dataclass(frozen=True)
class Principal:
    """The signed-in user of this request."""

    id: int
    email: str
    role: str
    totp: bool

    @property
    def actor(self) -> str:
        """The audit actor string, ``user:<id>``."""
        return f"user:{self.id}"

    def can(self, permission: str) -> bool:
        """True when the user's role holds ``permission``."""
        return self.role in PERMISSIONS[permission]


def current_user() -> Principal | None:
    """The signed-in user, or None."""
    user: Principal | None = g.get("user")
    return user


def require_user() -> Principal:
    """The signed-in user (views behind :func:`permission_required` only)."""
    user = current_user()
    assert user is not None
    return user


def origin() -> str | None:
    """The client address for audit events (after ProxyFix, when proxies are trusted)."""
    return request.remote_addr


def safe_next(target: str | None, default: str) -> str:
    """``target`` when it is a local path (no scheme, host or ``//``), else ``default``."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return default
    if "\\" in target:
        return default
    return target


def home_url(user: Principal | None) -> str:
    """Where a user lands after signing in."""
    if user is None:
        return url_for("auth.login")
    return url_for(HOME_BY_ROLE.get(user.role, "auth.account"))


def public(view: F) -> F:
    """Declare a view open to everyone, signed in or not."""
    view.permission = "public"  # type: ignore[attr-defined]
    return view


def permission_required(name: str) -> Callable[[F], F]:
    """Declare the permission a view needs: anonymous users are sent to the login page
    (302), signed-in users without it get 403."""
    if name not in PERMISSIONS:
        raise KeyError(name)

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                target = request.full_path if request.method == "GET" else None
                return redirect(url_for("auth.login", next=target.rstrip("?") if target else None))
            if not user.can(name):
                abort(403)
            return view(*args, **kwargs)

        wrapped.permission = name  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    return decorator


def recently_authenticated() -> bool:
    """True when the password (and TOTP) were checked within the step-up window."""
    auth_at = session.get("auth_at")
    window = runtime().settings.console_step_up_seconds
    return isinstance(auth_at, int | float) and time.time() - auth_at <= window


def _gettable(path: str) -> bool:
    """True when ``path`` is a page (a GET route): a form reached by POST cannot be returned to."""
    try:
        current_app.url_map.bind(request.host).match(path, method="GET")
    except HTTPException:
        return False
    return True


def _area_index() -> str:
    """The landing page of the current blueprint, else the user's home."""
    endpoint = f"{request.blueprint}.index"
    if request.blueprint and endpoint in current_app.view_functions:
        return url_for(endpoint)
    return url_for("auth.index")


def step_up_required(view: F) -> F:
    """Destructive actions: re-enter the password (and a TOTP code) when the last check is
    older than ``console_step_up_seconds``; the user is sent back to repeat the action."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if recently_authenticated():
            return view(*args, **kwargs)
        fallback = _area_index()
        if request.method == "GET":
            back = request.full_path.rstrip("?")
        else:
            referrer = urlsplit(request.referrer or "")
            same_host = referrer.netloc in ("", request.host)
            back = referrer.path + (f"?{referrer.query}" if referrer.query else "")
            back = back if same_host and _gettable(referrer.path) else fallback
        flash("Confirm it is you, then repeat the action.", "warning")
        return redirect(url_for("auth.reauth", next=safe_next(back, fallback)))

    return wrapped  # type: ignore[return-value]
