"""Upload-hook API (``/api/v1``) and service status (``/status``, ``/metrics``).

``bp`` is authenticated by bearer tokens, never by cookies, so the console's CSRF protection
must exempt it: ``csrf.exempt(admin.api.bp)`` (``API_BLUEPRINT_NAME`` names it).
"""

from __future__ import annotations

from admin.api.status import bp as status_bp
from admin.api.views import bp

API_BLUEPRINT_NAME = "api"

__all__ = ["API_BLUEPRINT_NAME", "bp", "status_bp"]
