"""Browser-test fixtures: the console served by a real HTTP server thread on localhost, and
Debian's Chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from moderation.config import Settings, load_settings
from moderation.service.runtime import Runtime
from tests.conftest import migrated_runtime

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
SECRET_KEY = "browser-test-secret-" + "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass
class Served:
    """A console being served: its base URL and the runtime the test uses on the same data."""

    url: str
    runtime: Runtime
    app: Any


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    """Development settings on plain-HTTP localhost (the only place that mode serves)."""
    return load_settings(
        data_dir=settings.data_dir,
        environment="development",
        secret_key=SECRET_KEY,
        console_plain_http_localhost=True,
    )


@pytest.fixture
def console_runtime(console_settings: Settings) -> Iterator[Runtime]:
    with migrated_runtime(console_settings) as rt:
        yield rt


@pytest.fixture
def served(console_settings: Settings, console_runtime: Runtime) -> Iterator[Served]:
    """``create_app`` behind werkzeug's threaded HTTP server on 127.0.0.1 (a free port);
    bank imports run in a background-thread job runner."""
    from admin import create_app
    from moderation.banks.jobs import ThreadJobRunner

    # No Celery worker here: the app's jobs run in a thread of this test process.
    app = create_app({"SETTINGS": console_settings, "JOB_RUNNER": ThreadJobRunner(console_runtime)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="console-server", daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.server_port}", console_runtime, app)
    finally:
        server.shutdown()
        thread.join(10)
        app.extensions["moderation.jobs"].join(60)
        app.extensions["moderation"].engine.dispose()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Headless Chromium from Debian (``bash scripts/browsers.sh`` installs it)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: run `bash scripts/browsers.sh` (make browsers)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh browser context and page; console errors (CSP violations included) collected
    on ``page.console_errors``."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    new_page.on("pageerror", lambda error: errors.append(str(error)))
    new_page.console_errors = errors
    new_page.set_default_timeout(30_000)
    try:
        yield new_page
    finally:
        context.close()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (``artifacts/`` is git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
