"""Flask extensions shared by the blueprints, bound to each app in ``create_app``."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()
"""CSRF tokens on every form (``csrf_token`` field); the bearer-token API is exempt."""

limiter = Limiter(key_func=get_remote_address, default_limits=[])
"""Rate limits (login and TOTP attempts); storage from settings (Redis when configured)."""
