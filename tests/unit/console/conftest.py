"""Console fixtures (flask tutorial's ``tests/conftest.py`` shape): ``app``, ``client``,
``runner``, users of every role, a login helper and review items built in the database."""

from __future__ import annotations

import functools
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select
from werkzeug.test import TestResponse

from moderation.config import Settings, load_settings
from moderation.service.runtime import Runtime
from tests.conftest import migrated_runtime

PASSWORD = "correct horse battery staple"
SECRET_KEY = "test-secret-" + "0123456789abcdefghijklmnopqrstuvwxyz"
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"|value="([^"]+)"[^>]*name="csrf_token"')


@dataclass
class ConsoleUser:
    """A user created for a test, with what is needed to sign in."""

    id: int
    email: str
    role: str
    password: str
    totp: bool
    last_step: int | None = None


def csrf_from(html: str) -> str:
    """The first CSRF token in a page."""
    match = CSRF_RE.search(html)
    assert match, "no csrf_token field on the page"
    return match.group(1) or match.group(2)


class ConsoleClient(FlaskClient):
    """A test client that sends a same-origin Referer (Flask-WTF checks it on HTTPS) and
    knows how to sign in."""

    runtime: Runtime

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ_base["HTTP_REFERER"] = "https://localhost/"

    def token(self, path: str = "/login") -> str:
        """A CSRF token for this client's session, read from a page's form."""
        response = self.get(path)
        assert response.status_code == 200, (path, response.status_code)
        return csrf_from(response.get_data(as_text=True))

    def form(self, path: str, data: dict[str, Any], *, token_from: str) -> TestResponse:
        """POST ``data`` with a valid CSRF token taken from the page at ``token_from``."""
        return self.post(path, data={**data, "csrf_token": self.token(token_from)})

    def totp_code(self, user: ConsoleUser) -> str:
        """A code for the next unused time step of ``user`` (now, or the one after)."""
        from moderation.governance.users import TOTP_INTERVAL, totp_code
        from moderation.storage.models import User

        now_step = int(time.time()) // TOTP_INTERVAL
        step = (
            now_step if user.last_step is None or user.last_step < now_step else user.last_step + 1
        )
        if step > now_step + 1:  # both usable steps spent: wait for the clock
            time.sleep((step - 1) * TOTP_INTERVAL - time.time() + 0.5)
        user.last_step = step
        with self.runtime.sessions() as db:
            row = db.get(User, user.id)
            assert row is not None
            at = datetime.fromtimestamp(step * TOTP_INTERVAL + 1, UTC)
            return totp_code(self.runtime.keyring, row, at=at)

    def login(self, user: ConsoleUser, *, follow: bool = False) -> TestResponse:
        """Sign in with password (and TOTP when the user has it); returns the last response."""
        response = self.form(
            "/login", {"email": user.email, "password": user.password}, token_from="/login"
        )
        assert response.status_code == 302, response.get_data(as_text=True)[:500]
        if user.totp:
            assert response.headers["Location"].endswith("/login/totp")
            response = self.form(
                "/login/totp", {"code": self.totp_code(user)}, token_from="/login/totp"
            )
            assert response.status_code == 302, response.get_data(as_text=True)[:500]
        if follow:
            return self.get(response.headers["Location"])
        return response


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    """Production settings (the default environment) with a strong secret key."""
    return load_settings(
        data_dir=settings.data_dir,
        secret_key=SECRET_KEY,
        console_login_rate_limit="1000 per minute",
    )


@pytest.fixture
def console_runtime(console_settings: Settings) -> Iterator[Runtime]:
    """A migrated runtime over ``console_settings`` (the test's own handle on the database)."""
    with migrated_runtime(console_settings) as rt:
        yield rt


@pytest.fixture
def make_app(console_runtime: Runtime) -> Iterator[Callable[..., Flask]]:
    """Build a console app over the test's data dir; keyword arguments override settings."""
    from admin import create_app
    from moderation.banks.jobs import InlineJobRunner

    apps: list[Flask] = []

    def build(config: dict[str, Any] | None = None, **overrides: Any) -> Flask:
        settings = console_runtime.settings
        if overrides:
            settings = load_settings(**{**settings.model_dump(exclude_unset=True), **overrides})
        app = create_app(
            {
                "SETTINGS": settings,
                "TESTING": True,
                "JOB_RUNNER": InlineJobRunner(console_runtime),
                **(config or {}),
            }
        )
        app.test_client_class = ConsoleClient
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["moderation"].engine.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The console with production settings (HTTPS, strong secret key), CSRF on."""
    return make_app()


@pytest.fixture
def client(app: Flask, console_runtime: Runtime) -> ConsoleClient:
    """A test client of ``app`` (HTTPS, same-origin Referer)."""
    test_client = app.test_client()
    assert isinstance(test_client, ConsoleClient)
    test_client.runtime = console_runtime
    return test_client


@pytest.fixture
def client_for(console_runtime: Runtime) -> Callable[[Flask], ConsoleClient]:
    """A new client (own cookie jar) of any app built by ``make_app``."""

    def build(target: Flask) -> ConsoleClient:
        test_client = target.test_client()
        assert isinstance(test_client, ConsoleClient)
        test_client.runtime = console_runtime
        return test_client

    return build


@pytest.fixture
def new_client(
    app: Flask, client_for: Callable[[Flask], ConsoleClient]
) -> Callable[[], ConsoleClient]:
    """Another browser on ``app``: a client with its own cookie jar."""
    return lambda: client_for(app)


@pytest.fixture
def runner(console_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Invoke the ``moderation`` CLI against the test's data dir."""
    from click.testing import CliRunner

    from moderation.cli import main

    monkeypatch.setenv("MODERATION_DATA_DIR", str(console_settings.data_dir))

    class Runner:
        def invoke(self, args: list[str], input: str | None = None) -> Any:
            return CliRunner().invoke(main, args, input=input, catch_exceptions=False)

    return Runner()


@pytest.fixture
def make_user(console_runtime: Runtime) -> Callable[..., ConsoleUser]:
    """Create a user: ``make_user("admin")``; TOTP as the role requires unless ``totp=``."""
    from moderation.governance.users import create_user
    from moderation.storage.db import transaction

    counter = iter(range(1, 1000))

    def build(role: str, *, totp: bool | None = None, email: str | None = None) -> ConsoleUser:
        address = email or f"{role}{next(counter)}@example.org"
        with transaction(console_runtime.sessions) as db:
            created = create_user(
                db,
                console_runtime.keyring,
                email=address,
                role=role,
                password=PASSWORD,
                totp=totp,
                actor="test",
            )
        return ConsoleUser(created.user_id, address, role, PASSWORD, created.totp_uri is not None)

    return build


def skimage_rgb(name: str) -> Image.Image:
    """A photo shipped in scikit-image's wheel, as RGB."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg_bytes(image: Image.Image, *, description: str | None = None) -> bytes:
    """``image`` as JPEG, optionally with an EXIF ImageDescription."""
    out = io.BytesIO()
    exif = Image.Exif()
    if description is not None:
        exif[0x010E] = description  # ImageDescription
    image.save(out, format="JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def build_review_item(
    rt: Runtime,
    image: Image.Image | None = None,
    *,
    external_id: str = "upload.jpg",
    description: str | None = None,
    label: str = "known-photo",
    priority: int = 50,
    bank: str = "known",
    data: bytes | None = None,
) -> int:
    """Put an upload with a ``review`` screening, one match and an open review item in the DB;
    returns the item's id.

    The screening is written by :func:`moderation.matching.recording.record_result` from a
    hand-made result, so the rows are exactly what real screenings produce (the decision path
    itself is tested with the real encoder elsewhere).
    """
    from moderation.banks.records import EntryInfo, create_bank
    from moderation.banks.sealed_fields import new_entry
    from moderation.matching.decision import MatchResult, ScreeningResult
    from moderation.matching.recording import record_result
    from moderation.service.uploads import create_upload
    from moderation.storage.db import transaction
    from moderation.storage.models import Bank, ReviewItem

    payload = (
        data
        if data is not None
        else jpeg_bytes(image or skimage_rgb("coffee"), description=description)
    )
    with transaction(rt.sessions) as db:
        bank_row = db.scalar(select(Bank).where(Bank.name == bank)) or create_bank(db, bank)
        entry = new_entry(
            db,
            rt.keyring,
            bank_id=bank_row.id,
            label=label,
            source_ref=f"{label}.jpg",
            added_by="test",
        )
        info = EntryInfo(entry.id, bank_row.id, bank_row.name, bank_row.kind, "default", label)
        result = ScreeningResult(
            decision="review",
            policy="default",
            score=0.72,
            reason=None,
            category="default",
            matches=(MatchResult(info, "review", 0.72, 40, None, 0, ("cosine",)),),
            timings_ms={"decode": 2.0, "embed": 30.0, "total": 40.0},
            encoder_id="test-encoder",
            index_version=1,
            classifier_version=None,
            review_priority=priority,
            explanation={
                "signals": ["cosine"],
                "candidates": [
                    {
                        "entry_id": entry.public_id,
                        "bank": bank_row.name,
                        "cosine": 0.72,
                        "pdq_distance": 40,
                        "probability": None,
                        "features": {"cosine": 0.72, "pdq_similarity": 0.84},
                    }
                ],
            },
        )
        upload = create_upload(
            db,
            payload,
            keyring=rt.keyring,
            blobs_dir=rt.settings.blobs_dir,
            external_id=external_id,
            source="cli",
            status="processing",
        )
        record_result(db, upload, result, actor="test")
        item = db.scalar(select(ReviewItem).where(ReviewItem.upload_id == upload.id))
        assert item is not None
        return item.id


@pytest.fixture
def make_review_item(console_runtime: Runtime) -> Callable[..., int]:
    """:func:`build_review_item` in the test's database."""
    return functools.partial(build_review_item, console_runtime)


# --- the session cookie (test_console_*_security.py) --------------------------------------


COOKIE = "__Host-moderation_session"


def session_cookie(response: Any, name: str = COOKIE) -> tuple[str, dict[str, str]]:
    """The session cookie a response sets: value and attributes (lower-cased names)."""
    for header in response.headers.getlist("Set-Cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        if name in parsed:
            morsel = parsed[name]
            flags = {k.lower(): v for k, v in morsel.items() if v}
            lowered = header.lower()
            flags["secure"] = "secure" if "; secure" in lowered else ""
            flags["httponly"] = "httponly" if "; httponly" in lowered else ""
            return morsel.value, flags
    raise AssertionError(f"no {name} cookie set")


def assert_security_headers(response: Any, *, hsts: bool = True) -> None:
    """RELIABILITY.md W4: the CSP, framing and sniffing headers, and HSTS unless ``hsts`` is off."""
    csp = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    assert "object-src 'none'" in csp
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    assert response.headers.get("X-Frame-Options") == "DENY"
    if hsts:
        assert response.headers.get("Strict-Transport-Security", "").startswith("max-age=31536000")
    else:
        assert "Strict-Transport-Security" not in response.headers
