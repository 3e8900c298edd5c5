"""The Flask admin console and upload-hook API: ``create_app`` (flask tutorial's factory shape).

Blueprints, one per area (STYLE.md rule 10), are listed in ``BLUEPRINTS`` and registered in
order. Views stay thin: validate, call one ``moderation`` library function, render or redirect.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from flask import Flask, current_app

from moderation.config import Settings, load_settings
from moderation.runtime import Runtime

# "module:attribute" of each blueprint, registered in this order.
BLUEPRINTS: tuple[str, ...] = ("admin.api:bp", "admin.api:status_bp")


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from :class:`~moderation.config.Settings`.

    ``test_config`` may carry ``SETTINGS`` (a ready :class:`Settings`) and any Flask config keys;
    without it, settings come from the environment like every other entry point.
    """
    app = Flask(__name__)
    config = dict(test_config or {})
    settings = config.pop("SETTINGS", None)
    if settings is None:
        settings = load_settings()
    if not isinstance(settings, Settings):
        raise TypeError("SETTINGS must be a moderation.config.Settings")
    app.config.from_mapping(config)
    app.extensions["moderation"] = Runtime(settings)
    for spec in BLUEPRINTS:
        module_name, attribute = spec.split(":")
        app.register_blueprint(getattr(importlib.import_module(module_name), attribute))
    return app


def runtime() -> Runtime:
    """The :class:`~moderation.runtime.Runtime` of the current app."""
    value = current_app.extensions["moderation"]
    assert isinstance(value, Runtime)
    return value
