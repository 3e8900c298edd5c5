"""Tenant isolation (issue 14 item 1): two API clients, through the real Flask test client.

Client A owns a private bank holding the coffee photo's PDQ; client B must neither match it, nor
see its name or labels, nor find it through the HMA API; a bank A shares with B applies to B;
B gets the same 404 for A's ids as for unknown ones, and cannot replay A's idempotency key.
Screenings run inline (``process_upload`` in a timer, as in ``test_api``) with the real encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from moderation.banks.hash_import import import_hash_list
from moderation.banks.index import CosineIndex
from moderation.banks.records import create_bank
from moderation.banks.tenancy import share_bank, unshare_bank
from moderation.cli import main
from moderation.config import load_settings
from moderation.governance.review import ReviewError, claim_next, queue_stats
from moderation.governance.tenancy import set_reviewer_client
from moderation.governance.users import create_user
from moderation.matching.candidates import search_within
from moderation.service.api_clients import create_api_client
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.queue import process_upload
from moderation.service.runtime import Runtime
from moderation.service.tenancy import set_client_policy
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, AuditEvent, ReviewItem, User
from tests.conftest import Cli
from tests.unit.conftest import unit_vectors
from tests.unit.test_api import inline_dispatcher, jpeg, make_app, post
from tests.unit.test_hma_api import pdq_of

PRIVATE = "a-private"
SHARED = "a-shared"


def _client(runtime: Runtime, name: str) -> tuple[int, str]:
    with transaction(runtime.sessions) as session:
        created = create_api_client(session, runtime.keyring, name)
    return created.client_id, created.token


def _bank(runtime: Runtime, tmp_path: Path, name: str, photo: str, owner: int | None) -> None:
    """A block bank holding ``photo``'s PDQ digest (label ``<photo>-label``)."""
    with transaction(runtime.sessions) as session:
        create_bank(session, name, owner_client_id=owner)
    listing = tmp_path / f"{name}.csv"
    listing.write_text(f"{pdq_of(jpeg(photo, 512))},100,{photo}-label\n")
    import_hash_list(runtime, name, listing, actor="test", fmt="pdq")


class Tenants:
    """Clients A and B, A's private and shared banks, and an app that screens inline."""

    def __init__(self, runtime: Runtime, tmp_path: Path) -> None:
        self.runtime = runtime
        self.a_id, self.a = _client(runtime, "platform-a")
        self.b_id, self.b = _client(runtime, "platform-b")
        _bank(runtime, tmp_path, PRIVATE, "coffee", self.a_id)
        _bank(runtime, tmp_path, SHARED, "rocket", self.a_id)
        dispatcher = inline_dispatcher(runtime, poll_interval=0)
        self.app: Flask = make_app(runtime, dispatcher, api_rate_limit="1000/minute")
        self.http: FlaskClient = self.app.test_client()

    def screen(self, token: str, photo: str, **kw: Any) -> Any:
        response = post(self.http, token, jpeg(photo, 512), query="?wait=20", **kw)
        assert response.status_code in (200, 202), response.get_data(as_text=True)
        return response

    def get(self, token: str, path: str) -> Any:
        return self.http.get(path, headers={"Authorization": f"Bearer {token}"})

    def sharing(self, change: Callable[..., Any], client: str | None) -> None:
        with transaction(self.runtime.sessions) as session:
            change(session, SHARED, client, actor="test")


@pytest.fixture
def tenants(runtime: Runtime, tmp_path: Path) -> Tenants:
    return Tenants(runtime, tmp_path)


def _banks_named(body: dict[str, Any]) -> list[str | None]:
    return [m["bank"] for m in body["result"]["matches"]]


def test_private_bank_blocks_only_its_owner_and_stays_unnamed(tenants: Tenants) -> None:
    mine = tenants.screen(tenants.a, "coffee").get_json()
    assert mine["result"]["decision"] == "block"
    assert _banks_named(mine) == [PRIVATE]
    assert mine["result"]["matches"][0]["label"] == "coffee-label"
    theirs = tenants.screen(tenants.b, "coffee").get_json()
    assert theirs["status"] == "done"
    assert theirs["result"]["decision"] == "allow" and theirs["result"]["matches"] == []
    assert PRIVATE not in str(theirs) and "coffee-label" not in str(theirs)


def test_shared_bank_applies_until_unshared_then_is_redacted(tenants: Tenants) -> None:
    assert tenants.screen(tenants.b, "rocket").get_json()["result"]["decision"] == "allow"
    tenants.sharing(share_bank, "platform-b")
    shared = tenants.screen(tenants.b, "rocket").get_json()
    assert shared["result"]["decision"] == "block" and _banks_named(shared) == [SHARED]
    assert shared["result"]["matches"][0]["label"] == "rocket-label"
    tenants.sharing(unshare_bank, "platform-b")
    # The recorded result no longer names the bank to B, nor its entry or label.
    again = tenants.get(tenants.b, f"/api/v1/screenings/{shared['id']}").get_json()
    match = again["result"]["matches"][0]
    assert match["bank"] is None and match["entry_id"] is None and match["label"] is None
    assert SHARED not in str(again) and "rocket-label" not in str(again)
    assert tenants.screen(tenants.b, "rocket").get_json()["result"]["decision"] == "allow"
    tenants.sharing(share_bank, None)  # with every client
    assert tenants.screen(tenants.b, "rocket").get_json()["result"]["decision"] == "block"
    with tenants.runtime.sessions() as session:
        actions = session.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.action.like("bank.%share"))
            .order_by(AuditEvent.seq)
        ).all()
    assert actions == ["bank.share", "bank.unshare", "bank.share"]


def test_other_clients_ids_and_keys_are_unknown(tenants: Tenants) -> None:
    first = tenants.screen(tenants.a, "coffee", headers={"Idempotency-Key": "k-1"})
    upload_id = first.get_json()["id"]
    foreign = tenants.get(tenants.b, f"/api/v1/screenings/{upload_id}")
    unknown = tenants.get(tenants.b, f"/api/v1/screenings/{'0' * 32}")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.get_json() == unknown.get_json()
    # B's request with A's key is B's own new upload, never A's.
    replay = tenants.screen(tenants.b, "coffee", headers={"Idempotency-Key": "k-1"})
    assert replay.get_json()["id"] != upload_id
    assert "Idempotent-Replayed" not in replay.headers
    assert replay.get_json()["result"]["decision"] == "allow"


def test_hma_api_hides_other_clients_banks(tenants: Tenants) -> None:
    pdq = pdq_of(jpeg("coffee", 512))
    lookup = f"/hma/m/lookup?signal_type=pdq&signal={pdq}"
    assert PRIVATE in tenants.get(tenants.a, lookup).get_json()
    assert tenants.get(tenants.b, lookup).get_json() == {}
    raw = f"/hma/m/raw_lookup?signal_type=pdq&signal={pdq}"
    assert tenants.get(tenants.b, raw).get_json() == {"matches": []}
    assert tenants.get(tenants.b, f"{raw}&banks={PRIVATE}").get_json() == {"matches": []}
    names = [b["name"] for b in tenants.get(tenants.b, "/hma/c/banks").get_json()]
    assert PRIVATE not in names and SHARED not in names
    mine = [b["name"] for b in tenants.get(tenants.a, "/hma/c/banks").get_json()]
    assert {PRIVATE, SHARED} <= set(mine)
    hidden = tenants.get(tenants.b, f"/hma/c/bank/{PRIVATE}")
    missing = tenants.get(tenants.b, "/hma/c/bank/no-such-bank")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.get_json()["message"].replace(PRIVATE, "X") == missing.get_json()[
        "message"
    ].replace("no-such-bank", "X")
    signal = {"pdq": "f" * 64}
    added = tenants.http.post(
        f"/hma/c/bank/{PRIVATE}/signal",
        json=signal,
        headers={"Authorization": f"Bearer {tenants.b}"},
    )
    assert added.status_code == 404
    tenants.sharing(share_bank, "platform-b")
    read_only = tenants.http.post(
        f"/hma/c/bank/{SHARED}/signal",
        json=signal,
        headers={"Authorization": f"Bearer {tenants.b}"},
    )
    assert read_only.status_code == 403


def test_client_policy_decides_its_uploads(runtime: Runtime, tmp_path: Path) -> None:
    """B's own policy sends what A's (the default) blocks to review."""
    policies = tmp_path / "policies"
    policies.mkdir()
    text = (runtime.settings.policies_dir / "default.yaml").read_text()
    assert "    action: block\n" in text
    (policies / "default.yaml").write_text(text)
    (policies / "b-review.yaml").write_text(
        text.replace("name: default", "name: b-review").replace(
            "    action: block\n", "    action: review\n"
        )
    )
    rt = Runtime(load_settings(data_dir=runtime.settings.data_dir, policies_dir=policies))
    tenants = Tenants(rt, tmp_path)
    with transaction(rt.sessions) as session:
        set_client_policy(session, rt, "platform-b", "b-review", actor="test")
    tenants.sharing(share_bank, None)
    a_result = tenants.screen(tenants.a, "rocket").get_json()["result"]
    b_result = tenants.screen(tenants.b, "rocket").get_json()["result"]
    assert (a_result["decision"], a_result["policy"]) == ("block", "default")
    assert (b_result["decision"], b_result["policy"]) == ("review", "b-review")
    with rt.sessions() as session:
        item = session.scalar(select(ReviewItem))
        assert item is not None and item.client_id == tenants.b_id
        assert session.scalar(select(ApiClient.policy).where(ApiClient.id == tenants.b_id))


def test_review_queue_filters_and_scopes_by_client(runtime: Runtime, tmp_path: Path) -> None:
    """Unscannable uploads of A and B go to review; a reviewer scoped to B claims only B's."""
    settings = load_settings(data_dir=runtime.settings.data_dir, api_rate_limit="1000/minute")
    state = WorkerState(runtime, poll_interval=0)
    state.screener()
    a_id, a = _client(runtime, "platform-a")
    b_id, b = _client(runtime, "platform-b")
    http = make_app(runtime, RecordingDispatcher()).test_client()
    broken = jpeg("coffee")[:300]  # JPEG magic, truncated: unscannable -> review
    ids = {}
    for name, token in (("a", a), ("b", b)):
        ids[name] = post(http, token, broken).get_json()["id"]
        process_upload(runtime, ids[name], state.screener, max_attempts=3)
    with transaction(runtime.sessions) as session:
        reviewer = create_user(
            session,
            runtime.keyring,
            email="r@example.com",
            role="reviewer",
            password="correct horse battery staple",
            totp=False,
            actor="test",
        )
        set_reviewer_client(session, "r@example.com", "platform-b", actor="test")
    limits = {"lease_seconds": 60, "daily_limit": settings.review_daily_exposure_limit}
    with transaction(runtime.sessions) as session:
        assert queue_stats(session, client_id=a_id).open == 1
        assert queue_stats(session).open == 2
        with pytest.raises(ReviewError):
            claim_next(session, reviewer_id=reviewer.user_id, client_id=a_id, **limits)
        item = claim_next(session, reviewer_id=reviewer.user_id, **limits)
        assert item is not None and item.upload_id == ids["b"] and item.client_id == b_id


def test_cli_sets_owner_sharing_policy_and_reviewer_scope(cli: Cli) -> None:
    cli("init")
    for name in ("platform-a", "platform-b"):
        cli("api-client", "create", name)
    created = cli.json_lines("bank", "create", "private", "--owner", "platform-a")[-1]
    assert created["owner"] == "platform-a"
    assert cli.json_lines("bank", "sharing", "private")[-1] == {
        "bank": "private",
        "owner": "platform-a",
        "shared_with_all": False,
        "shared_with": [],
    }
    shared = cli.json_lines("bank", "share", "private", "--client", "platform-b")[-1]
    assert shared["shared_with"] == ["platform-b"]
    assert (
        cli.json_lines("bank", "unshare", "private", "--client", "platform-b")[-1]["shared_with"]
        == []
    )
    assert cli.json_lines("bank", "share", "private", "--all")[-1]["shared_with_all"] is True
    assert cli.json_lines("bank", "set-owner", "private", "--deployment")[-1]["owner"] is None
    assert cli("bank", "share", "private", ok=False).exit_code == 2  # --client or --all
    assert cli("bank", "share", "private", "--client", "nobody", ok=False).exit_code == 3
    assert cli("api-client", "set-policy", "platform-b", "../etc", ok=False).exit_code == 3
    assert cli("api-client", "set-policy", "platform-b", "missing", ok=False).exit_code == 3
    cli("api-client", "set-policy", "platform-b", "default")
    made = cli.runner.invoke(
        main,
        ["users", "create", "r@example.com", "--role", "reviewer", "--password-stdin"],
        input="correct horse battery staple\n",
    )
    assert made.exit_code == 0, made.output
    cli("users", "set-client", "r@example.com", "platform-b")
    assert cli("users", "set-client", "nobody@example.com", ok=False).exit_code == 2
    runtime = Runtime(load_settings(data_dir=cli.data_dir))
    with runtime.sessions() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
        user = session.scalar(select(User).where(User.email == "r@example.com"))
        assert user is not None and user.client_id is not None
    expected = ["bank.create", "bank.share", "bank.unshare", "bank.share", "bank.set_owner"]
    assert [a for a in actions if a.startswith("bank.")] == expected
    assert "api_client.set_policy" in actions and "user.set_client" in actions


def test_other_tenants_entries_never_crowd_out_a_clients_own() -> None:
    """With top-k = 3 and the 50 nearest entries another tenant's, a client still gets its own
    three nearest (what a search of its entries alone returns)."""
    rng = np.random.default_rng(7)
    query = unit_vectors(rng, 1, 16)
    near = query + 0.01 * unit_vectors(rng, 50, 16)
    far = unit_vectors(rng, 200, 16)
    vectors = np.vstack([near / np.linalg.norm(near, axis=1, keepdims=True), far])
    ids = np.arange(len(vectors))
    mine = ids[50:]  # the other tenant owns ids 0-49, the nearest
    index = CosineIndex.build(ids, vectors.astype(np.float32))
    alone = CosineIndex.build(mine, vectors[50:].astype(np.float32))
    scoped = search_within(index, query, 3, -1.0, lambda i: i >= 50)
    assert [h.id for h in scoped[0]] == [h.id for h in alone.search(query, 3, -1.0)[0]]
    assert all(h.id >= 50 for h in scoped[0]) and len(scoped[0]) == 3
