"""Concurrent review claims against PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` hands
every reviewer a different item, even when their transactions overlap."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from moderation.banks.records import EntryInfo, create_bank
from moderation.banks.sealed_fields import new_entry
from moderation.config import load_settings
from moderation.governance.review import claim_next
from moderation.governance.review_decisions import decide
from moderation.governance.users import create_user
from moderation.matching.decision import MatchResult, ScreeningResult
from moderation.matching.recording import record_result
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import LabelledPair, ReviewItem

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_runtime(postgres_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = load_settings(data_dir=tmp_path / "var", database_url=postgres_url)
    rt = prepared_runtime(settings)
    yield rt
    rt.engine.dispose()


def _reviewers(rt: Runtime, count: int) -> list[int]:
    ids = []
    with transaction(rt.sessions) as db:
        for n in range(count):
            ids.append(
                create_user(
                    db,
                    rt.keyring,
                    email=f"r{n}@example.org",
                    role="reviewer",
                    password="correct horse battery staple",
                    actor="test",
                ).user_id
            )
    return ids


def _items(rt: Runtime, count: int) -> set[int]:
    ids = set()
    with transaction(rt.sessions) as db:
        bank = create_bank(db, "known")
        for n in range(count):
            entry = new_entry(
                db, rt.keyring, bank_id=bank.id, label=f"e{n}", source_ref=f"e{n}.jpg"
            )
            info = EntryInfo(entry.id, bank.id, bank.name, "block", "default", f"e{n}")
            upload = create_upload(
                db, b"not an image", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir
            )
            result = ScreeningResult(
                decision="review",
                policy="default",
                score=0.7,
                reason=None,
                category="default",
                matches=(MatchResult(info, "review", 0.7, None, None, 0, ("cosine",)),),
                timings_ms={"total": 10.0},
                encoder_id="e",
                index_version=1,
                classifier_version=None,
                review_priority=50,
                explanation={"candidates": []},
            )
            record_result(db, upload, result)
        ids = set(db.scalars(select(ReviewItem.id)))
    return ids


def _holding_claim(rt: Runtime, hold_s: float) -> Callable[[int], int | None]:
    """A reviewer's claim whose transaction stays open ``hold_s`` after claiming."""

    def work(user_id: int) -> int | None:
        with transaction(rt.sessions) as db:
            item = claim_next(db, reviewer_id=user_id, lease_seconds=600, daily_limit=100)
            item_id = item.id if item is not None else None
            time.sleep(hold_s)  # keep the row lock while the others look
        return item_id

    return work


def test_concurrent_claims_never_share_an_item(
    pg_runtime: Runtime, race: Callable[..., dict[int, int | None]]
) -> None:
    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(pg_runtime.engine, "before_cursor_execute", capture)
    reviewers = _reviewers(pg_runtime, 8)
    items = _items(pg_runtime, 5)
    got = race(_holding_claim(pg_runtime, hold_s=0.3), reviewers)
    claimed = [i for i in got.values() if i is not None]
    assert len(claimed) == len(set(claimed)) == len(items)
    assert set(claimed) == items
    assert list(got.values()).count(None) == len(reviewers) - len(items)
    assert any("FOR UPDATE SKIP LOCKED" in s for s in statements)

    # Every claim is recorded once, and each reviewer can settle exactly their own item.
    with pg_runtime.sessions() as db:
        rows = {r.id: r for r in db.scalars(select(ReviewItem))}
    for user_id, item_id in got.items():
        if item_id is None:
            continue
        assert rows[item_id].claimed_by == user_id and rows[item_id].state == "claimed"
        assert decide(pg_runtime, item_id, reviewer_id=user_id, decision="confirm").final == "block"
    with pg_runtime.sessions() as db:
        reviewed = select(LabelledPair).where(LabelledPair.source == "review")
        assert len(db.scalars(reviewed).all()) == len(items)


def test_repeated_races_stay_exclusive(
    pg_runtime: Runtime, race: Callable[..., dict[int, int | None]]
) -> None:
    reviewers = _reviewers(pg_runtime, 4)
    items = _items(pg_runtime, 12)
    seen: list[int] = []
    for _round in range(3):
        got = race(_holding_claim(pg_runtime, hold_s=0.05), reviewers)
        round_items = [i for i in got.values() if i is not None]
        assert len(round_items) == len(set(round_items)) == len(reviewers)
        for user_id, item_id in got.items():
            assert item_id is not None
            decide(pg_runtime, item_id, reviewer_id=user_id, decision="not_a_match")
        seen.extend(round_items)
    assert len(seen) == len(set(seen)) == len(items)
