"""Generic request hardening of the web tier (RELIABILITY.md S8-S12).

- S8: request bodies are capped before anything parses them: :data:`FORM_MAX_BYTES` for every
  console request, anonymous ones included, and ``console_max_import_bytes`` only for a
  signed-in user allowed to use a view marked :func:`bulk_upload` (the bank imports). The API
  and HMA views set their own limits (``request.max_content_length`` in the view).
- S9: integers in paths (the ``int`` converter) and query strings (:func:`query_int`) and form
  fields (:func:`bounded_int`) are bounded to what the database stores: 404 or 400, not 500.
- S10: ``TRUSTED_HOSTS`` (Flask >= 3.1) from ``MODERATION_TRUSTED_HOSTS``; production without
  it answers localhost only.
- S12: every value a template prints has its bidirectional-text controls replaced by visible
  ``[U+202E]`` marks (:func:`neutralise_bidi`, Jinja's ``finalize``), so an external id, label
  or EXIF value cannot reorder the text around it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, abort, current_app, request, session
from werkzeug.exceptions import SecurityError
from werkzeug.routing import IntegerConverter, Map

from admin.security import MACHINE_BLUEPRINTS
from moderation.config import Settings

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

FORM_MAX_BYTES = 64 * 1024
"""Largest body of a console request that is not a bank import, bytes (the largest console
form, an API client's callback allowlist, is a few KiB)."""
DB_INT_MAX = 2**31 - 1
"""Largest id a path may carry: PostgreSQL ``integer`` (SQLite's is 2**63 - 1)."""
DB_BIGINT_MAX = 2**63 - 1
"""Largest ``bigint`` (PostgreSQL) and SQLite integer, e.g. the audit log's ``seq``."""
LOCAL_HOSTS = ("localhost", "127.0.0.1")
"""Hosts production answers to when ``MODERATION_TRUSTED_HOSTS`` is unset (werkzeug cannot
match IPv6 literals in a trusted-host list)."""
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Unicode's explicit directional formatting characters (UAX #9 section 2: embeddings,
overrides, isolates, their terminators) and the implicit marks ALM, LRM and RLM."""
_BIDI_RE = re.compile("[" + "".join(sorted(BIDI_CONTROLS)) + "]")
_BIDI_MARKS = {ord(c): f"[U+{ord(c):04X}]" for c in BIDI_CONTROLS}
_QUERY_INT_RE = re.compile(r"-?[0-9]{1,19}")


class BoundedIntConverter(IntegerConverter):
    """werkzeug's ``int`` converter with ``max`` defaulting to :data:`DB_INT_MAX`: a larger
    number does not match the route (404) instead of overflowing the database driver (500)."""

    def __init__(
        self,
        map: Map,
        fixed_digits: int = 0,
        min: int | None = None,
        max: int | None = DB_INT_MAX,
        signed: bool = False,
    ) -> None:
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=max, signed=signed)


def init_app(app: Flask, settings: Settings, *, testing: bool) -> None:
    """Bind the bounded ``int`` converter, body limits and the bidi filter to ``app`` (its
    ``TRUSTED_HOSTS`` come from :func:`trusted_hosts`); call it before anything else registers
    ``before_request`` functions (CSRF reads the body), routes (rules are compiled with the
    converters in place when added) or touches ``app.jinja_env``."""
    app.url_map.converters["int"] = BoundedIntConverter
    if settings.environment == "production" and not settings.trusted_hosts and not testing:
        logger.warning(
            "MODERATION_TRUSTED_HOSTS is unset: answering Host %s only (RELIABILITY.md S10)",
            ", ".join(LOCAL_HOSTS),
        )
    app.before_request(_limit_body)
    app.register_error_handler(SecurityError, _untrusted_host)
    app.jinja_options = {**app.jinja_options, "finalize": neutralise_bidi}


def trusted_hosts(settings: Settings) -> list[str] | None:
    """Flask's ``TRUSTED_HOSTS``: the configured names; else :data:`LOCAL_HOSTS` in production
    and None (any host) in development."""
    if settings.trusted_hosts:
        return list(settings.trusted_hosts)
    return list(LOCAL_HOSTS) if settings.environment == "production" else None


def _untrusted_host(error: SecurityError) -> Any:
    """400 for a Host outside ``TRUSTED_HOSTS``, as plain text: no URL can be built for such a
    request (the error page's links need one), and none should point at that host."""
    response = current_app.response_class(
        "400 Bad Request: this host name is not served here.\n", status=400, mimetype="text/plain"
    )
    return response


def bulk_upload(view: F) -> F:
    """Mark a console view that takes a large upload (up to ``console_max_import_bytes``)
    from signed-in users holding the view's permission; every other console request is held
    to :data:`FORM_MAX_BYTES`."""
    view.bulk_upload = True  # type: ignore[attr-defined]
    return view


def _limit_body() -> None:
    """Cap the body of this request before CSRF or a view parses it: 413 at once when its
    declared length is over the cap; a chunked body is cut off at the cap by werkzeug."""
    if request.blueprint in MACHINE_BLUEPRINTS:
        return  # bearer-token views set their own limit before they read
    limit = FORM_MAX_BYTES
    view = current_app.view_functions.get(request.endpoint or "")
    if getattr(view, "bulk_upload", False) and _may_upload(getattr(view, "permission", "")):
        limit = _settings().console_max_import_bytes + FORM_MAX_BYTES
    request.max_content_length = limit
    if request.content_length is not None and request.content_length > limit:
        abort(413)


def _settings() -> Settings:
    from admin import runtime

    return runtime().settings


def _may_upload(permission: str) -> bool:
    """True when the session is signed in as an enabled user whose role holds ``permission``
    (the same test ``load_user`` and ``permission_required`` make, done here because the
    limit must be set before CSRF reads the body)."""
    from admin import runtime
    from admin.permissions import PERMISSIONS
    from moderation.storage.models import User

    user_id = session.get("user_id")
    if not isinstance(user_id, int) or permission not in PERMISSIONS:
        return False
    with runtime().sessions() as db:
        user = db.get(User, user_id)
        return user is not None and not user.disabled and user.role in PERMISSIONS[permission]


def query_int(
    name: str, default: int | None = None, *, minimum: int = 1, maximum: int = DB_INT_MAX
) -> int | None:
    """The integer query parameter ``name`` (``default`` when absent or empty).

    Raises:
        werkzeug.exceptions.BadRequest: not a decimal integer from ``minimum`` to ``maximum``
            (400; the database would overflow on larger ones, RELIABILITY.md S9).
    """
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    value = int(raw) if _QUERY_INT_RE.fullmatch(raw) else None
    if value is None or not minimum <= value <= maximum:
        abort(400, f"{name} must be an integer from {minimum} to {maximum}")
    return value


def bounded_int(value: Any) -> int:
    """``int(value)`` for form fields' ``coerce``, refusing ids the database cannot hold.

    Raises:
        ValueError: not an integer, or outside 0..:data:`DB_INT_MAX` (WTForms turns it into a
            validation error, so the form answers 400).
    """
    number = int(value)
    if not 0 <= number <= DB_INT_MAX:
        raise ValueError(f"{number} is out of range")
    return number


def neutralise_bidi(value: Any) -> Any:
    """Jinja ``finalize``: text printed by a template with each bidi control replaced by a
    visible mark (``"a\\u202eb"`` -> ``"a[U+202E]b"``); other values unchanged. The marks
    contain no HTML syntax, so this is safe inside attributes and keeps Markup safe."""
    if isinstance(value, str) and _BIDI_RE.search(value):
        return value.translate(_BIDI_MARKS)  # Markup's translate returns Markup
    return value
