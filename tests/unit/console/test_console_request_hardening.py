"""The console and API under abuse, through Flask's test client (RELIABILITY.md S8-S12): body
limits before parsing, bounded integers, trusted hosts, logout by POST only, bidi controls.

``tests/integration/test_web_abuse_console.py`` repeats each row over real HTTP against
``moderation serve``."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from markupsafe import Markup

from admin.hardening import BIDI_CONTROLS, FORM_MAX_BYTES, neutralise_bidi
from moderation.banks.records import create_bank
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from tests.unit.console.conftest import assert_security_headers
from tests.unit.console.test_console_banks import bank_id, photo_zip

HUGE = "9" * 30
"""Larger than any integer column (and than int64)."""


class CountingStream(io.RawIOBase):
    """A request body of ``size`` bytes that counts how much of it was read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # werkzeug's test client measures the body by seeking to its end

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.size + offset if whence == 2 else offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        buffer[:n] = b"a" * n
        self.pos += n
        self.read_bytes += n
        return n


def multipart(size: int, **fields: str) -> tuple[bytes, str]:
    """A multipart body with one ``size``-byte file part and ``fields``; and its content type."""
    boundary = "----hardening"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; filename="a.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n".encode()
        + b"z" * size
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def bank(console_runtime: Runtime) -> int:
    with transaction(console_runtime.sessions) as db:
        create_bank(db, "known")
    return bank_id(console_runtime, "known")


# --- S8: request bodies are capped before anything parses them ----------------------------


def test_s8_anonymous_body_is_refused_before_it_is_read(client: Any) -> None:
    body = CountingStream(10 * 1024 * 1024)
    response = client.post(
        "/login",
        input_stream=body,
        content_type="multipart/form-data; boundary=x",
    )
    assert response.status_code == 413
    assert body.read_bytes == 0


def test_s8_anonymous_form_over_the_limit_is_413_under_it_is_parsed(client: Any) -> None:
    data, content_type = multipart(2 * FORM_MAX_BYTES, email="a@example.org")
    assert client.post("/login", data=data, content_type=content_type).status_code == 413
    small, content_type = multipart(1000, email="a@example.org")
    # Parsed, then refused by CSRF (no token): the small limit does not block real forms.
    assert client.post("/login", data=small, content_type=content_type).status_code == 400


def test_s8_signed_in_forms_other_than_imports_keep_the_small_limit(
    client: Any, make_user: Callable[..., Any], bank: int
) -> None:
    client.login(make_user("admin"))
    token = client.token("/banks")
    response = client.post(
        "/banks", data={"name": "x" * (2 * FORM_MAX_BYTES), "kind": "block", "csrf_token": token}
    )
    assert response.status_code == 413


def test_s8_bank_import_has_its_own_limit_for_those_who_may_import(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    make_app: Callable[..., Flask],
    client_for: Callable[[Flask], Any],
    bank: int,
) -> None:
    archive = photo_zip()
    assert len(archive) > 4 * FORM_MAX_BYTES
    admin = make_user("admin")
    client.login(admin)
    accepted = client.post(
        f"/banks/{bank}/import",
        data={"archive": (io.BytesIO(archive), "bank.zip"), "csrf_token": client.token("/banks")},
        content_type="multipart/form-data",
    )
    assert accepted.status_code == 302 and accepted.headers["Location"].startswith("/banks/jobs/")

    # A signed-in user without banks.write is held to the small limit (not parsed, then 403).
    reviewer = new_client()
    reviewer.login(make_user("reviewer"))
    data, content_type = multipart(2 * FORM_MAX_BYTES)
    refused = reviewer.post(f"/banks/{bank}/import", data=data, content_type=content_type)
    assert refused.status_code == 413
    # Anonymous: the same.
    anonymous = new_client()
    assert (
        anonymous.post(f"/banks/{bank}/import", data=data, content_type=content_type).status_code
        == 413
    )

    # The import limit itself is MODERATION_CONSOLE_MAX_IMPORT_BYTES (plus the form around it).
    small = client_for(make_app(console_max_import_bytes=FORM_MAX_BYTES))
    small.login(admin)
    too_big = small.post(
        f"/banks/{bank}/import-hashes",
        data={
            "hashes": (io.BytesIO(b"0" * (3 * FORM_MAX_BYTES)), "hashes.txt"),
            "csrf_token": small.token("/banks"),
        },
        content_type="multipart/form-data",
    )
    assert too_big.status_code == 413


# --- S9: out-of-range integers: 404 or 400, never 500 ---------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/review/{HUGE}",
        "/review/2147483648",
        "/review/-1",
        f"/review/{HUGE}/image",
        f"/banks/{HUGE}",
        f"/banks/jobs/{HUGE}",
    ],
)
def test_s9_out_of_range_path_ids_are_404(
    client: Any, make_user: Callable[..., Any], path: str
) -> None:
    client.login(make_user("admin"))
    assert client.get(path).status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        f"/review?client={HUGE}",
        "/review?client=-5",
        f"/audit?before={HUGE}",
        "/audit?before=abc",
        f"/banks/BANK?page={HUGE}",
        "/banks/BANK?page=-3",
        "/banks/BANK?page=2147483648",
    ],
)
def test_s9_out_of_range_query_integers_are_400(
    client: Any, make_user: Callable[..., Any], bank: int, query: str
) -> None:
    client.login(make_user("admin"))
    response = client.get(query.replace("BANK", str(bank)))
    assert response.status_code == 400
    assert "must be an integer from" in response.get_data(as_text=True)


def test_s9_in_range_query_integers_still_work(
    client: Any, make_user: Callable[..., Any], bank: int
) -> None:
    client.login(make_user("admin"))
    assert client.get(f"/banks/{bank}?page=2").status_code == 200
    assert client.get("/audit?before=5").status_code == 200
    assert client.get("/review?client=").status_code == 200


def test_s9_out_of_range_form_integers_are_400(
    client: Any, make_user: Callable[..., Any], bank: int
) -> None:
    client.login(make_user("admin"))
    claim = client.form("/review/claim", {"queue": "main", "client": HUGE}, token_from="/review")
    assert claim.status_code == 400
    remove = client.form(
        f"/banks/{bank}/entries/remove", {"entry_ids": HUGE}, token_from=f"/banks/{bank}"
    )
    assert remove.status_code == 400


# --- S10: trusted hosts ------------------------------------------------------------------


def test_s10_production_answers_localhost_only_by_default(client: Any) -> None:
    assert client.get("/login").status_code == 200
    response = client.get("/login", headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert_security_headers(response)  # W4 holds for this error too


def test_s10_configured_hosts_and_subdomains(
    make_app: Callable[..., Flask], client_for: Callable[[Flask], Any]
) -> None:
    client = client_for(make_app(trusted_hosts=["console.example", ".ops.example"]))
    assert client.get("/login", headers={"Host": "console.example"}).status_code == 200
    assert client.get("/login", headers={"Host": "a.ops.example:8443"}).status_code == 200
    for host in ("localhost", "evil.example", "console.example.evil.example"):
        assert client.get("/login", headers={"Host": host}).status_code == 400, host
    # The API is behind the same check: no Host of another site reaches a view.
    assert client.get("/status/live", headers={"Host": "evil.example"}).status_code == 400


def test_s10_forwarded_host_from_a_trusted_proxy_is_checked_too(
    make_app: Callable[..., Flask], client_for: Callable[[Flask], Any]
) -> None:
    client = client_for(make_app(console_trusted_proxies=1))
    response = client.get(
        "/login", headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    )
    assert response.status_code == 400 and "Location" not in response.headers


def test_s10_development_answers_any_host_unless_configured(
    make_app: Callable[..., Flask], client_for: Callable[[Flask], Any]
) -> None:
    client = client_for(make_app(environment="development"))
    assert client.get("/login", headers={"Host": "dev.example"}).status_code == 200


# --- S11: logout is a CSRF-protected POST --------------------------------------------------


def test_s11_logout_by_get_or_without_token_leaves_the_session(
    client: Any, make_user: Callable[..., Any]
) -> None:
    client.login(make_user("reviewer"))
    assert client.get("/logout").status_code == 405
    assert client.post("/logout").status_code == 400  # no CSRF token
    assert client.post("/logout", data={"csrf_token": "forged"}).status_code == 400
    assert client.get("/account").status_code == 200  # still signed in
    page = client.get("/account").get_data(as_text=True)
    assert 'method="post" action="/logout"' in page
    assert client.form("/logout", {}, token_from="/account").status_code == 302
    assert client.get("/account").status_code == 302  # signed out


# --- S12: bidi controls cannot reorder the console's text ----------------------------------

RLO = "\u202e"


def test_s12_review_page_shows_bidi_controls_as_marks(
    client: Any, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    client.login(make_user("reviewer"))
    item = make_review_item(
        external_id=f"invoice{RLO}gpj.exe",
        label=f"label\u202b{RLO}\u200f",
    )
    assert client.form("/review/claim", {"queue": "main"}, token_from="/review").status_code == 302
    page = client.get(f"/review/{item}").get_data(as_text=True)
    assert not BIDI_CONTROLS & set(page)
    assert "invoice[U+202E]gpj.exe" in page
    assert "label[U+202B][U+202E][U+200F]" in page


def test_s12_echoed_form_values_and_attributes_are_marked(
    client: Any, make_user: Callable[..., Any]
) -> None:
    client.login(make_user("admin"))
    page = client.get(f"/audit?actor=user{RLO}1&action=a\u061cb").get_data(as_text=True)
    assert not BIDI_CONTROLS & set(page)
    assert 'value="user[U+202E]1"' in page and 'value="a[U+061C]b"' in page


def test_s12_finalize_keeps_types_and_markup_safe() -> None:
    assert neutralise_bidi(f"a{RLO}<b>") == "a[U+202E]<b>"
    assert not isinstance(neutralise_bidi(f"a{RLO}<b>"), Markup)  # still escaped later
    marked = neutralise_bidi(Markup(f"<b>a{RLO}</b>"))
    assert isinstance(marked, Markup) and marked == Markup("<b>a[U+202E]</b>")
    assert neutralise_bidi(7) == 7 and neutralise_bidi(None) is None
    assert neutralise_bidi("plain") == "plain"
