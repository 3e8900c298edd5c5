"""Flood control (noisy-entry quarantine): daily match counts, the threshold rule, the quarantine's
effect on decisions (real encoder, real snapshot), confirm and release, audit events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.flood_control import (
    FloodLimits,
    _median,
    check_flood,
    confirm_entry,
    find_flooding,
    list_quarantined,
    release_entry,
)
from moderation.banks.match_counts import count_matches, utc_today
from moderation.banks.operations import import_bank
from moderation.banks.records import BlocklistError, create_bank
from moderation.config import load_settings
from moderation.matching.policy import PolicyError, load_policy, parse_policy
from moderation.matching.recording import record_result
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.uploads import create_upload
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, Entry, EntryMatchCount
from tests.conftest import skimage_photo_path

DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
LIMITS = FloodLimits(max_matches_per_day=1000, bank_median_multiple=100, min_matches=50)


def test_default_policy_documents_flood_control() -> None:
    rules = load_policy(DEFAULT.parent, "default").flood_control
    assert (rules.enabled, rules.max_matches_per_day) == (True, 1000)
    assert (rules.bank_median_multiple, rules.min_matches) == (100, 50)
    document = yaml.safe_load(DEFAULT.read_text())
    document["flood_control"]["min_matches"] = 2000
    with pytest.raises(PolicyError, match="min_matches must be <= max_matches_per_day"):
        parse_policy(document, source="test")


def test_median_counts_unmatched_entries_as_zero() -> None:
    assert _median([], 0) == 0.0
    assert _median([5], 1) == 5.0
    assert _median([1, 3], 5) == 0.0
    assert _median([2, 4, 6], 4) == 3.0
    assert _median([2, 4, 6], 3) == 4.0


def _entries(session: Session, bank: str, counts: list[int], *, kind: str = "block") -> list[int]:
    """A bank with one entry per count, each matched that many times today."""
    bank_row = create_bank(session, bank, kind=kind)
    session.flush()
    ids = []
    for count in counts:
        entry = Entry(bank_id=bank_row.id)
        session.add(entry)
        session.flush()
        ids.append(entry.id)
        if count:
            session.add(EntryMatchCount(entry_id=entry.id, day=utc_today(), matches=count))
    return ids


def test_the_threshold_rule_picks_the_noisy_entries_only(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        # Mostly idle bank: median 0, so the floor min_matches (50) decides.
        idle = _entries(session, "idle", [60, 49, 1, 0, 0, 0, 0])
        # Busy bank: median 3, threshold 300.
        busy = _entries(session, "busy", [3, 3, 3, 3, 299, 400])
        # Very busy bank: median 20, 100 x 20 = 2000 is above the cap, which decides.
        capped = _entries(session, "capped", [20, 20, 20, 20, 999, 1500])
        # Allow banks are never quarantined.
        _entries(session, "allowed", [5000], kind="allow")
        # Disabled entries are not looked at.
        disabled = _entries(session, "disabled", [5000])
        session.get(Entry, disabled[0]).disabled = True  # type: ignore[union-attr]
    with runtime.sessions() as session:
        found = find_flooding(session, LIMITS, day=utc_today())
    assert [f.entry_id for f in found] == [f"e_{idle[0]}", f"e_{busy[5]}", f"e_{capped[5]}"]
    figures = {f.bank: (f.matches, f.bank_median, f.threshold) for f in found}
    assert figures == {"idle": (60, 0.0, 50), "busy": (400, 3.0, 300), "capped": (1500, 20.0, 1000)}


def test_counts_and_check_flood_with_audit_events(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        noisy, quiet, *_ = _entries(session, "memes", [0, 0, 0, 0, 0])
        for _ in range(60):
            count_matches(session, [noisy, noisy], day=utc_today())  # once per screening
        count_matches(session, [quiet, 999_999], day=utc_today())  # unknown ids are skipped
    with runtime.sessions() as session:
        rows = session.execute(select(EntryMatchCount.entry_id, EntryMatchCount.matches)).all()
        counts = {eid: n for eid, n in rows}
    assert counts == {noisy: 60, quiet: 1}

    found = check_flood(runtime, actor="test")
    assert [f.entry_id for f in found] == [f"e_{noisy}"]
    assert check_flood(runtime, actor="test") == []  # already quarantined: nothing new
    with runtime.sessions() as session:
        entry = session.get(Entry, noisy)
        assert entry is not None and entry.quarantined_at is not None
        assert entry.quarantine_reason == f"60 matches on {utc_today()} >= 50 (bank memes median 0)"
        assert session.get(Entry, quiet).quarantined_at is None  # type: ignore[union-attr]
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "entry.quarantine")
        ).all()
        listed = list_quarantined(session, runtime.keyring)
    assert [(e.target, e.actor, e.details["matches"]) for e in events] == [
        (f"entry:e_{noisy}", "test", 60)
    ]
    assert [(q["entry_id"], q["matches_today"]) for q in listed] == [(f"e_{noisy}", 60)]

    with pytest.raises(BlocklistError, match="not quarantined"):
        confirm_entry(runtime, f"e_{quiet}", actor="test")
    assert confirm_entry(runtime, f"e_{noisy}", actor="test")["outcome"] == "confirmed"
    assert check_flood(runtime, actor="test") == []  # confirmed today: left alone today
    with transaction(runtime.sessions) as session:
        entry = session.get(Entry, noisy)
        assert entry is not None and entry.quarantined_at is None and not entry.disabled
        assert entry.quarantine_confirmed_on == utc_today()
        entry.quarantine_confirmed_on = utc_today() - timedelta(days=1)
    assert [f.entry_id for f in check_flood(runtime, actor="test")] == [f"e_{noisy}"]
    released = release_entry(runtime, f"e_{noisy}", actor="test")
    assert (released["outcome"], released["disabled"]) == ("released", True)
    with runtime.sessions() as session:
        entry = session.get(Entry, noisy)
        assert entry is not None and entry.disabled and entry.quarantined_at is None
        actions = list(
            session.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.target == f"entry:e_{noisy}")
                .order_by(AuditEvent.seq)
            )
        )
    assert actions == [
        "entry.quarantine",
        "entry.quarantine_confirm",
        "entry.quarantine",
        "entry.quarantine_release",
    ]


def test_disabled_flood_control_quarantines_nothing(tmp_path: Path) -> None:
    with _runtime_with_flood(tmp_path, enabled=False, max_matches_per_day=1, min_matches=1) as rt:
        with transaction(rt.sessions) as session:
            _entries(session, "b", [5])
        assert check_flood(rt, actor="test") == []


# --- through the real encoder and snapshot --------------------------------------------------


def _runtime_with_flood(tmp_path: Path, **flood: object) -> _Prepared:
    document = yaml.safe_load(DEFAULT.read_text())
    document["name"] = "flood"
    document["flood_control"].update(flood)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "flood.yaml").write_text(yaml.safe_dump(document))
    settings = load_settings(data_dir=tmp_path / "var", policies_dir=policies, policy="flood")
    return _Prepared(prepared_runtime(settings))


class _Prepared:
    """A runtime as a context manager that disposes of its engine."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __enter__(self) -> Runtime:
        return self.rt

    def __exit__(self, *_: object) -> None:
        self.rt.engine.dispose()


@pytest.fixture
def flood_runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A block bank of two photos; flood control caps an entry at 2 matches a day."""
    with _runtime_with_flood(tmp_path, max_matches_per_day=2, min_matches=1) as rt:
        with transaction(rt.sessions) as session:
            create_bank(session, "known-bad")
        paths = [skimage_photo_path(name) for name in ("chelsea", "astronaut")]
        import_bank(rt, "known-bad", paths, actor="test")
        yield rt


def test_screenings_count_and_a_quarantined_entry_only_reaches_review(
    flood_runtime: Runtime,
) -> None:
    rt = flood_runtime
    photo = skimage_photo_path("chelsea").read_bytes()
    first = rt.screener().screen_bytes([photo])[0]
    assert first.decision == "block"
    matched = first.matches[0].entry.entry_id
    for _ in range(2):  # two screenings (two uploads) matching the same entry
        with transaction(rt.sessions) as session:
            upload = create_upload(
                session, photo, keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir
            )
            record_result(session, upload, first)
    with rt.sessions() as session:
        rows = session.execute(select(EntryMatchCount.entry_id, EntryMatchCount.matches)).all()
    assert [tuple(r) for r in rows] == [(matched, 2)]

    before = datetime.now(UTC)
    found = check_flood(rt, actor="flood_control")
    assert [f.entry_id for f in found] == [f"e_{matched}"] and found[0].threshold == 2
    with rt.sessions() as session:
        entry = session.get(Entry, matched)
        assert entry is not None and entry.quarantined_at is not None
        assert entry.quarantined_at.replace(tzinfo=UTC) >= before - timedelta(seconds=1)

    # A new screener (what a worker builds after the snapshot version changed) sees it.
    quarantined = rt.screener().screen_bytes([photo])[0]
    assert quarantined.decision == "review"
    assert quarantined.matches[0].entry.quarantined
    assert "quarantined" in quarantined.matches[0].signals

    confirm_entry(rt, f"e_{matched}", actor="test")
    assert rt.screener().screen_bytes([photo])[0].decision == "block"
