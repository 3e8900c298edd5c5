"""Review items from real screenings (real encoder, real encrypted bank), decided end to end:
confirm adds the upload to a block bank, not-a-match to an allow bank, and the next screening
of the same image follows the reviewers' decisions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.governance.review import ReviewError, claim_next, release
from moderation.governance.review_decisions import decide
from moderation.governance.review_display import item_view
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import Entry, LabelledPair, Screening, Upload
from tests.conftest import skimage_photo_path

BANNED = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture
def screened(console_runtime: Runtime, review_band_copies: dict[str, Path]) -> dict[str, Path]:
    """A block bank of four photos and an allow bank; three edited copies screened to review."""
    rt = console_runtime
    with transaction(rt.sessions) as db:
        create_bank(db, "known")
        create_bank(db, "benign", kind="allow")
    import_bank(rt, "known", [skimage_photo_path(n) for n in BANNED], actor="test")
    results: list[dict[str, Any]] = []
    screen_paths(rt, list(review_band_copies.values()), on_result=results.append)
    for result in results:
        assert result["decision"] == "review", result  # the policy's review band moved?
    return review_band_copies


def test_reviewers_settle_real_screenings(
    console_runtime: Runtime, make_user: Callable[..., Any], screened: dict[str, Path]
) -> None:
    rt = console_runtime
    reviewer = make_user("reviewer")
    settings = rt.settings
    claimed: list[int] = []
    for _ in range(3):
        with transaction(rt.sessions) as db:
            item = claim_next(
                db,
                reviewer_id=reviewer.id,
                lease_seconds=settings.review_lease_seconds,
                daily_limit=settings.review_daily_exposure_limit,
                exclude=claimed,
            )
            assert item is not None
            claimed.append(item.id)
        # Skip it, so the next claim gives another item (a reviewer holds one at a time).
        with transaction(rt.sessions) as db:
            assert release(db, item.id, reviewer.id)
    by_name: dict[str, int] = {}
    with rt.sessions() as db:
        for item_id in claimed:
            view = item_view(db, item_id, rt.keyring)
            assert view is not None and view.matches
            assert view.matches[0].bank == "known" and view.matches[0].cosine is not None
            assert "cosine" in view.matches[0].signals
            name = Path(view.external_id or "").stem.replace("-edited", "")
            by_name[name] = item_id
    assert set(by_name) == set(screened)

    def take(item_id: int) -> None:
        with transaction(rt.sessions) as db:
            got = claim_next(
                db,
                reviewer_id=reviewer.id,
                lease_seconds=60,
                daily_limit=100,
                exclude=[i for i in claimed if i != item_id],
            )
            assert got is not None and got.id == item_id

    # A block bank is the wrong kind for "not a match".
    take(by_name["astronaut"])
    with pytest.raises(ReviewError, match="allow banks"):
        decide(
            rt,
            by_name["astronaut"],
            reviewer_id=reviewer.id,
            decision="not_a_match",
            bank_name="known",
        )
    confirmed = decide(
        rt, by_name["astronaut"], reviewer_id=reviewer.id, decision="confirm", bank_name="known"
    )
    assert confirmed.entry_id is not None and confirmed.snapshot_version is not None

    take(by_name["coffee"])
    allowed = decide(
        rt, by_name["coffee"], reviewer_id=reviewer.id, decision="not_a_match", bank_name="benign"
    )
    assert allowed.final == "allow" and allowed.entry_id is not None

    take(by_name["rocket"])
    assert decide(rt, by_name["rocket"], reviewer_id=reviewer.id, decision="escalate").final is None

    with rt.sessions() as db:
        added = {
            e.upload_id: e for e in db.scalars(select(Entry).where(Entry.upload_id.is_not(None)))
        }
        assert set(added) == {confirmed.upload_id, allowed.upload_id}
        assert added[confirmed.upload_id].bank.name == "known"
        assert added[allowed.upload_id].bank.name == "benign"
        reviewed = select(LabelledPair).where(LabelledPair.source == "review")
        pairs = db.scalars(reviewed.order_by(LabelledPair.id)).all()
        assert [(p.upload_id, p.is_copy) for p in pairs] == [
            (confirmed.upload_id, True),
            (allowed.upload_id, False),
        ]
        # Features come from the screening's explanation (empty without a classifier stage).
        for pair in pairs:
            screening = db.scalar(select(Screening).where(Screening.upload_id == pair.upload_id))
            assert screening is not None
            candidate = next(
                c
                for c in screening.explanation["candidates"]
                if c["entry_id"] == f"e_{pair.entry_id}"
            )
            assert pair.features == candidate["features"]
        uploads = {u.id: u.external_id for u in db.scalars(select(Upload))}

    # The same images screened again now follow the reviewers: block, and allow (allow bank).
    again: dict[str, dict[str, Any]] = {}
    screen_paths(
        rt,
        [screened["astronaut"], screened["coffee"]],
        on_result=lambda r: again.__setitem__(Path(r["path"]).stem, r),
    )
    assert again["astronaut-edited"]["decision"] == "block"
    assert again["astronaut-edited"]["matches"][0]["entry_id"] == confirmed.entry_id
    assert again["coffee-edited"]["decision"] == "allow"
    assert again["coffee-edited"]["reason"] == "allow_bank"
    assert uploads[confirmed.upload_id] == str(screened["astronaut"])
