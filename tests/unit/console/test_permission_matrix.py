"""W7: every route of the app's URL map x every role (and anonymous) has an explicit expected
status; a route missing from the matrix fails the test.

GET requests are plain; POST requests carry a valid CSRF token and an empty form, so a role
that may act gets 400 (nothing changes) and one that may not gets 403 (or, signed out, 302 to
the login page). Routes other blueprints own (the API and status pages of the queue) are in
the matrix too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

ROLES = ("anonymous", "admin", "reviewer", "auditor", "dpo")
CONSOLE_BLUEPRINTS = {
    "auth",
    "review",
    "appeals",
    "banks",
    "dashboard",
    "audit",
    "gdpr",
    "clients",
    "encoder",
    "holds",
}


def only(allowed: int, *roles: str, other: int = 403, anonymous: int = 302) -> dict[str, Any]:
    """``allowed`` for ``roles``, ``other`` for the remaining roles, ``anonymous`` signed out."""
    table: dict[str, Any] = {role: (allowed if role in roles else other) for role in ROLES[1:]}
    table["anonymous"] = anonymous
    return table


def everyone(status: Any) -> dict[str, Any]:
    return dict.fromkeys(ROLES, status)


SIGNED_IN = ("admin", "reviewer", "auditor", "dpo")

# (normalised rule, method) -> role -> expected status (an int, or a set when state decides).
MATRIX: dict[tuple[str, str], dict[str, Any]] = {
    ("/", "GET"): everyone(302),
    ("/login", "GET"): {**everyone(302), "anonymous": 200},
    ("/login", "POST"): everyone(400),
    ("/login/totp", "GET"): everyone(302),
    ("/login/totp", "POST"): everyone(302),
    ("/logout", "POST"): everyone(302),
    ("/reauth", "GET"): only(200, *SIGNED_IN),
    ("/reauth", "POST"): only(400, *SIGNED_IN),
    ("/account", "GET"): only(200, *SIGNED_IN),
    ("/account/totp", "POST"): only(400, *SIGNED_IN),
    ("/users", "GET"): only(200, "admin"),
    ("/users", "POST"): only(400, "admin"),
    ("/users/<>/disabled", "POST"): only(400, "admin"),
    ("/users/<>/role", "POST"): only(400, "admin"),
    ("/users/<>/password", "POST"): only(400, "admin"),
    ("/users/<>/totp", "POST"): only(400, "admin"),
    ("/review", "GET"): only(200, "admin", "reviewer"),
    ("/review/claim", "POST"): only(400, "admin", "reviewer"),
    ("/review/<>", "GET"): only(200, "admin", "reviewer"),
    ("/review/<>/image", "GET"): only(200, "admin", "reviewer"),
    ("/review/<>/act", "POST"): only(400, "admin", "reviewer"),
    # No appeal in the world: its pages are 404 to those who may see them.
    ("/review/appeals/<>", "GET"): only(404, "admin", "reviewer"),
    ("/review/appeals/<>/image", "GET"): only(404, "admin", "reviewer"),
    ("/review/appeals/<>/claim", "POST"): only(404, "admin", "reviewer"),
    ("/review/appeals/<>/reveal", "POST"): only(404, "admin", "reviewer"),
    ("/review/appeals/<>/decide", "POST"): only(400, "admin", "reviewer"),
    ("/decisions/export", "POST"): only(400, "admin", "auditor"),
    ("/review/allow-proposals", "GET"): only(200, "admin", "reviewer"),
    ("/review/allow-proposals/<>", "POST"): only(400, "admin", "reviewer"),
    # The world's approval is a removal request, not an allow proposal: no preview.
    ("/review/allow-proposals/<>/image", "GET"): only(404, "admin", "reviewer"),
    ("/banks", "GET"): only(200, "admin", "auditor"),
    ("/banks", "POST"): only(400, "admin"),
    ("/banks/<>", "GET"): only(200, "admin", "auditor"),
    ("/banks/<>/import", "POST"): only(400, "admin"),
    ("/banks/<>/import-hashes", "POST"): only(400, "admin"),
    ("/banks/<>/enabled", "POST"): only(400, "admin"),
    ("/banks/<>/rename", "POST"): only(400, "admin"),
    ("/banks/<>/sharing", "POST"): only(400, "admin"),
    ("/banks/<>/delete", "POST"): only(400, "admin"),
    ("/banks/<>/entries/remove", "POST"): only(400, "admin"),
    ("/banks/<>/entries/<>/disabled", "POST"): only(400, "admin"),
    ("/banks/<>/entries/<>/quarantine", "POST"): only(400, "admin"),
    ("/banks/jobs/<>", "GET"): only(200, "admin", "auditor"),
    ("/banks/approvals", "GET"): only(200, "admin", "auditor"),
    ("/banks/approvals/<>", "POST"): only(400, "admin"),
    ("/dashboard", "GET"): only(200, "admin", "auditor", "dpo"),
    ("/audit", "GET"): only(200, "admin", "auditor"),
    ("/audit/verify", "GET"): only(200, "admin", "auditor"),
    ("/audit/export", "POST"): only(400, "admin", "auditor"),
    ("/gdpr", "GET"): only(200, "dpo"),
    ("/gdpr/register", "POST"): only(400, "dpo"),
    ("/gdpr/preview", "POST"): only(400, "dpo"),
    ("/gdpr/erase", "POST"): only(400, "dpo"),
    ("/clients", "GET"): only(200, "admin"),
    ("/clients", "POST"): only(400, "admin"),
    ("/clients/<>/revoke", "POST"): only(400, "admin"),
    ("/clients/<>/rotate", "POST"): only(400, "admin"),
    ("/clients/<>/allowlist", "POST"): only(400, "admin"),
    ("/encoder", "GET"): only(200, "admin", "auditor"),
    ("/encoder/migrate", "POST"): only(400, "admin"),
    ("/encoder/promote", "POST"): only(400, "admin"),
    ("/encoder/rollback", "POST"): only(400, "admin"),
    ("/holds", "GET"): only(200, "admin", "dpo"),
    ("/holds", "POST"): only(400, "admin", "dpo"),
    ("/holds/<>/release", "POST"): only(400, "admin", "dpo"),
    ("/static/<>", "GET"): everyone(200),
    # The queue's status pages and bearer-token API: public or bearer-only whatever the
    # console role (a console session is no API credential). /metrics and the detailed
    # /status need the metrics token, not configured here: not served.
    ("/status", "GET"): everyone(404),
    ("/status/live", "GET"): everyone(200),
    ("/status/ready", "GET"): everyone({200, 503}),
    ("/api/v1/screenings", "POST"): everyone(401),
    ("/api/v1/screenings/<>", "GET"): everyone(401),
    ("/api/v1/screenings/<>/appeal", "POST"): everyone(401),
    ("/api/v1/openapi.json", "GET"): everyone(200),
    ("/metrics", "GET"): everyone(404),
    **{
        ("/api/v1/<>", method): everyone(404)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
    },
    # The HMA-compatible API: bearer tokens only, like /api/v1.
    ("/hma/m/raw_lookup", "GET"): everyone(401),
    ("/hma/m/lookup", "GET"): everyone(401),
    ("/hma/m/lookup", "POST"): everyone(401),
    ("/hma/h/hash", "POST"): everyone(401),
    ("/hma/c/banks", "GET"): everyone(401),
    ("/hma/c/bank/<>", "GET"): everyone(401),
    ("/hma/c/bank/<>/signal", "POST"): everyone(401),
    **{("/hma/<>", method): everyone(404) for method in ("GET", "POST", "PUT", "PATCH", "DELETE")},
}


def normalise(rule: str) -> str:
    return re.sub(r"<[^>]+>", "<>", rule)


def routes(app: Flask) -> list[tuple[str, str, Any]]:
    found = []
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((normalise(rule.rule), method, rule))
    return found


def test_every_route_is_in_the_matrix_and_declares_a_permission(app: Flask) -> None:
    missing = [(r, m) for r, m, _ in routes(app) if (r, m) not in MATRIX]
    assert not missing, f"routes without expected statuses: {missing}"
    stale = [key for key in MATRIX if key not in {(r, m) for r, m, _ in routes(app)}]
    assert not stale, f"matrix rows for routes that do not exist: {stale}"
    for _rule, _method, rule in routes(app):
        blueprint = rule.endpoint.split(".", 1)[0]
        if blueprint in CONSOLE_BLUEPRINTS:
            view = app.view_functions[rule.endpoint]
            assert getattr(view, "permission", None), f"{rule.endpoint} declares no permission"


@pytest.fixture
def world(
    console_runtime: Any, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> dict[str, Any]:
    """One object of each kind the routes take ids of, and a user per role."""
    from sqlalchemy import select

    from moderation.governance.approvals import request_removal
    from moderation.governance.review import claim_next
    from moderation.storage.console import Job
    from moderation.storage.db import transaction
    from moderation.storage.models import Bank, Entry

    users = {role: make_user(role) for role in SIGNED_IN}
    second_admin = make_user("admin")
    item = make_review_item()
    with transaction(console_runtime.sessions) as db:
        claimed = claim_next(
            db, reviewer_id=users["reviewer"].id, lease_seconds=3600, daily_limit=10
        )
        assert claimed is not None and claimed.id == item
        bank = db.scalars(select(Bank)).one()
        entry = db.scalars(select(Entry)).first()
        assert entry is not None
        job = Job(kind="bank.import", state="done", params={"bank": bank.name}, created_by="test")
        db.add(job)
        db.flush()
        approval = request_removal(
            db,
            action="entries.delete",
            bank_id=bank.id,
            entry_ids=[entry.id],
            requested_by=second_admin.id,
        )
        values = {
            "item_id": item,
            "bank_id": bank.id,
            "entry_id": entry.id,
            "job_id": job.id,
            "approval_id": approval.id,
            "user_id": users["auditor"].id,
            "filename": "css/console.css",
        }
    return {"users": users, "values": values}


def url_for_rule(rule: Any, values: dict[str, Any]) -> str:
    args = {name: values.get(name, "0") for name in rule.arguments}
    path = rule.rule
    for name, value in args.items():
        path = re.sub(rf"<(?:[^:>]+:)?{name}>", str(value), path)
    return path


@pytest.mark.parametrize("role", ROLES)
def test_w7_permission_matrix(role: str, app: Flask, client: Any, world: dict[str, Any]) -> None:
    if role != "anonymous":
        client.login(world["users"][role])
        token = client.token("/account")
    else:
        token = client.token("/login")
    plan = routes(app)
    # Signing out comes last, so it does not end the session the other requests use.
    plan.sort(key=lambda p: (p[0] == "/logout", p[1] == "GET"))
    failures = []
    for normalised, method, rule in plan:
        expected = MATRIX[(normalised, method)][role]
        url = url_for_rule(rule, world["values"])
        if method == "GET":
            response = client.get(url)
        else:
            response = client.open(url, method=method, data={"csrf_token": token})
        response.close()
        allowed = expected if isinstance(expected, set) else {expected}
        if response.status_code not in allowed:
            failures.append(
                f"{method} {url} as {role}: {response.status_code}, expected {expected}"
            )
    assert not failures, "\n".join(failures)
