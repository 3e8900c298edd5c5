"""Security set-up of the console: production checks, headers, cookies, CSRF, rate limits.

RELIABILITY.md rows: W1 (cookie flags, new session id), W3 (CSRF), W4 (headers on every
response, errors included), W8 (login rate limit), W10 (production refuses a missing or default
secret key and debug mode).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, abort, jsonify, redirect, render_template, request
from flask_talisman import Talisman
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from admin.extensions import csrf, limiter
from admin.sessions import DatabaseSessionInterface
from moderation.config import ConfigurationError, Settings

logger = logging.getLogger(__name__)

MIN_SECRET_KEY_LENGTH = 32
"""Characters; ``secrets.token_urlsafe(32)`` gives 43."""
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "default",
        "dev",
        "development",
        "flask",
        "insecure",
        "key",
        "password",
        "secret",
        "secret-key",
        "secret_key",
        "secretkey",
        "test",
        "testing",
        "your-secret-key",
        "yoursecretkey",
    }
)
"""Placeholder values from tutorials and templates, refused whatever their length."""

CONTENT_SECURITY_POLICY: dict[str, str] = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "font-src": "'self'",
    "connect-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
"""No inline script or style anywhere: JavaScript and CSS are vendored files under /static."""

HSTS_MAX_AGE = 365 * 24 * 3600
"""One year, as hstspreload.org asks."""

MACHINE_BLUEPRINTS = frozenset({"api", "status", "hma"})
"""Blueprints called by programs (upload hooks, probes, Prometheus), not by browsers."""

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _weak_secret(value: str) -> str | None:
    if len(value) < MIN_SECRET_KEY_LENGTH:
        return f"shorter than {MIN_SECRET_KEY_LENGTH} characters"
    stripped = value.strip().lower()
    if stripped in KNOWN_DEFAULT_SECRETS or len(set(stripped)) < 8:
        return "a placeholder or low-variety value"
    return None


def secret_key_for(settings: Settings, *, testing: bool) -> str:
    """The Flask secret key, refusing to start production without a strong one.

    Raises:
        ConfigurationError: production with ``MODERATION_SECRET_KEY`` unset, short or a known
            placeholder (RELIABILITY.md W10).
    """
    configured = settings.secret_key.get_secret_value() if settings.secret_key else None
    hint = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
    if configured is not None:
        problem = _weak_secret(configured)
        if problem is None:
            return configured
        if settings.environment == "production":
            raise ConfigurationError(f"MODERATION_SECRET_KEY is {problem}; {hint}")
        logger.warning("MODERATION_SECRET_KEY is %s (accepted outside production)", problem)
        return configured
    if settings.environment == "production" and not testing:
        raise ConfigurationError(
            f"MODERATION_SECRET_KEY is not set: the console refuses to start in production; {hint}"
        )
    if not testing:
        logger.warning("no MODERATION_SECRET_KEY: using a throw-away key (development only)")
    return secrets.token_urlsafe(48)


def check_production(app: Flask, settings: Settings) -> None:
    """Refuse unsafe production set-ups (RELIABILITY.md W10).

    Raises:
        ConfigurationError: Flask debug on, or plain-HTTP mode, in production.
    """
    if settings.environment != "production":
        return
    if app.debug:
        raise ConfigurationError(
            "Flask debug mode is on (FLASK_DEBUG or DEBUG): it must be off in production"
        )
    if settings.console_plain_http_localhost:
        raise ConfigurationError(
            "MODERATION_CONSOLE_PLAIN_HTTP_LOCALHOST is for local development only"
        )


def flask_config(settings: Settings, *, testing: bool) -> dict[str, Any]:
    """Flask and extension configuration derived from settings."""
    plain = settings.console_plain_http_localhost
    return {
        "SECRET_KEY": secret_key_for(settings, testing=testing),
        "MAX_CONTENT_LENGTH": max(settings.console_max_import_bytes, settings.max_image_bytes),
        "PREFERRED_URL_SCHEME": "http" if plain else "https",
        "WTF_CSRF_TIME_LIMIT": int(settings.console_session_hours * 3600),
        "WTF_CSRF_FIELD_NAME": "csrf_token",
        "RATELIMIT_STORAGE_URI": settings.effective_redis_url or "memory://",
        "RATELIMIT_KEY_PREFIX": "moderation:ratelimit",
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
        "RATELIMIT_HEADERS_ENABLED": True,
    }


def _is_api_request() -> bool:
    return request.path.startswith("/api/")


def _error_response(error: HTTPException) -> Any:
    code = error.code or 500
    if request.path.startswith("/hma/"):  # HMA's error shape (admin.hma)
        response = jsonify({"message": error.description or error.name})
        response.status_code = code
        return response
    if _is_api_request():
        name = (error.name or "error").lower().replace(" ", "_")
        response = jsonify({"error": {"code": name, "message": error.description or name}})
        response.status_code = code
        return response
    description = error.description if code != 500 else "Something went wrong on our side."
    return render_template(
        "errors/error.html", code=code, name=error.name, message=description
    ), code


def init_app(app: Flask, settings: Settings, sessions: Any) -> None:
    """Bind headers, sessions, CSRF, rate limits and error pages to ``app``."""
    plain = settings.console_plain_http_localhost
    _install_headers(app, settings, plain=plain)
    app.session_interface = DatabaseSessionInterface(
        sessions,
        lifetime=timedelta(hours=settings.console_session_hours),
        idle=timedelta(minutes=settings.console_session_idle_minutes),
        secure=not plain,
    )
    csrf.init_app(app)
    limiter.init_app(app)
    app.before_request(_loopback_only if plain else _https_only)
    # Also reached for unhandled exceptions (as InternalServerError) and CSRFError (400).
    app.register_error_handler(HTTPException, _error_response)


def _install_headers(app: Flask, settings: Settings, *, plain: bool) -> None:
    """Trust the configured proxies' forwarded headers and set the security headers
    (HSTS, CSP, frame and referrer policies) and the session cookie's flags."""
    if settings.console_trusted_proxies:
        n = settings.console_trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    Talisman(
        app,
        # Redirecting plain HTTP is done by _https_only, for the console's pages only.
        force_https=False,
        strict_transport_security=True,
        strict_transport_security_max_age=HSTS_MAX_AGE,
        strict_transport_security_include_subdomains=True,
        frame_options="DENY",
        content_security_policy=CONTENT_SECURITY_POLICY,
        referrer_policy="same-origin",
        session_cookie_secure=not plain,
        session_cookie_http_only=True,
        x_content_type_options=True,
    )


def _https_only() -> Any:
    # Browsers are sent to HTTPS (the session cookie is Secure). Machine endpoints (the
    # bearer-token API, health probes, metrics) are left alone: a redirect would only
    # break their clients, and HSTS still applies once they use HTTPS.
    if request.is_secure or request.headers.get("X-Forwarded-Proto") == "https":
        return None
    if request.blueprint in MACHINE_BLUEPRINTS or request.path.startswith(("/api/", "/hma/")):
        return None
    return redirect(request.url.replace("http://", "https://", 1), code=302)


def _loopback_only() -> None:
    # Plain HTTP is allowed for a developer's own machine, nothing else.
    host = urlsplit("//" + request.host).hostname or ""
    remote = request.remote_addr or ""
    try:
        remote_loopback = ipaddress.ip_address(remote).is_loopback
    except ValueError:
        remote_loopback = False
    if host not in LOOPBACK_HOSTS or not remote_loopback:
        abort(400, "plain-HTTP mode serves localhost only")


def exempt_api(app: Flask) -> None:
    """The bearer-token APIs (``admin.api``, ``admin.hma``) take no cookies, so CSRF tokens do
    not apply."""
    for blueprint in app.blueprints.values():
        if blueprint.import_name.split(".")[:2] in (["admin", "api"], ["admin", "hma"]):
            csrf.exempt(blueprint)
