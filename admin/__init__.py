"""The Flask admin console and upload-hook API: ``create_app`` (flask tutorial's factory shape).

Blueprints, one per area (STYLE.md rule 10), are listed in ``BLUEPRINTS`` and registered in
order. Views stay thin: validate, call one ``moderation`` library function, render or redirect.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app

from moderation.config import Settings, load_settings
from moderation.service.runtime import Runtime

# "module:attribute" of each blueprint, registered in this order.
BLUEPRINTS: tuple[str, ...] = (
    "admin.auth:bp",
    "admin.review:bp",
    "admin.appeals:bp",
    "admin.banks:bp",
    "admin.dashboard:bp",
    "admin.audit:bp",
    "admin.gdpr:bp",
    "admin.clients:bp",
    "admin.encoder:bp",
    "admin.holds:bp",
    "admin.api:bp",
    "admin.api:status_bp",
    "admin.hma:bp",
)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from :class:`~moderation.config.Settings`.

    ``test_config`` may carry ``SETTINGS`` (a ready :class:`Settings`), ``JOB_RUNNER`` (a
    :class:`moderation.banks.jobs.JobRunner`; default: Celery workers, so a restart of the web
    process loses no import, :mod:`moderation.banks.job_recovery`) and any Flask
    config keys; without it, settings come from the environment like every other entry point.

    Raises:
        moderation.config.ConfigurationError: unsafe production settings (no or a default
            secret key, debug on: RELIABILITY.md W10).
    """
    from admin import hardening, security

    app = Flask(__name__)
    config = dict(test_config or {})
    settings = config.pop("SETTINGS", None)
    job_runner = config.pop("JOB_RUNNER", None)
    if settings is None:
        settings = load_settings()
    if not isinstance(settings, Settings):
        raise TypeError("SETTINGS must be a moderation.config.Settings")
    testing = bool(config.get("TESTING"))
    app.config.from_mapping(security.flask_config(settings, testing=testing))
    app.config["TRUSTED_HOSTS"] = hardening.trusted_hosts(settings)
    app.config.from_mapping(config)
    security.check_production(app, settings)
    hardening.init_app(app, settings, testing=testing)
    rt = Runtime(settings)
    app.extensions["moderation"] = rt
    app.extensions["moderation.jobs"] = job_runner or _celery_job_runner(settings)
    security.init_app(app, settings, lambda: rt.sessions)
    for spec in BLUEPRINTS:
        module_name, attribute = spec.split(":")
        app.register_blueprint(getattr(importlib.import_module(module_name), attribute))
    security.exempt_api(app)
    _install_admission(app, settings)
    app.jinja_env.filters["age"] = _age
    app.jinja_env.filters["utc"] = _utc_text
    return app


def _install_admission(app: Flask, settings: Settings) -> None:
    """Bound the requests this process works on at once (``admin.admission``), outermost."""
    from admin.admission import RequestAdmission

    largest_upload = max(settings.max_image_bytes, settings.max_video_bytes) + 64 * 1024
    admission = RequestAdmission(app.wsgi_app, settings.web_active_requests, largest_upload)
    app.wsgi_app = admission  # type: ignore[method-assign]
    app.extensions["moderation.admission"] = admission


def request_admission() -> Any:
    """The current app's :class:`admin.admission.RequestAdmission`."""
    return current_app.extensions["moderation.admission"]


def _celery_job_runner(settings: Settings) -> Any:
    """Console imports go to the Celery workers (``moderation.run_job``), never a web thread."""
    from workers.celery_app import create_celery
    from workers.dispatch import CeleryJobRunner

    return CeleryJobRunner(create_celery(settings))


def runtime() -> Runtime:
    """The :class:`~moderation.service.runtime.Runtime` of the current app."""
    value = current_app.extensions["moderation"]
    assert isinstance(value, Runtime)
    return value


def _utc_text(value: datetime | None) -> str:
    if value is None:
        return "-"
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = int(seconds)
    if value < 120:
        return f"{value} s"
    if value < 7200:
        return f"{value // 60} min"
    if value < 2 * 86400:
        return f"{value // 3600} h"
    return f"{value // 86400} d"
