"""Dashboard figures computed from rows with known values, and the page's inline SVG charts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update

from moderation.governance.dashboard import dashboard_stats
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import ErasureRequest, IndexSnapshot, Screening, Upload


def add_screenings(rt: Runtime, rows: list[tuple[str, float, datetime, int]]) -> None:
    """(decision, total ms, created_at, index_version) per screening."""
    with transaction(rt.sessions) as db:
        for decision, total, when, version in rows:
            upload = Upload(status="done")
            db.add(upload)
            db.flush()
            db.add(
                Screening(
                    upload_id=upload.id,
                    decision=decision,
                    policy="default",
                    timings={"embed": total / 2, "total": total},
                    index_version=version,
                    created_at=when,
                )
            )


def test_stats_from_known_rows(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    rt = console_runtime
    now = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    totals = [float(t) for t in range(1, 101)]
    rows = [
        (decision, totals[i], now - timedelta(hours=h, minutes=5), 2)
        for i, (decision, h) in enumerate(
            [("allow", 0)] * 50
            + [("block", 1)] * 30
            + [("review", 3)] * 15
            + [("unscannable", 23)] * 5
        )
    ]
    add_screenings(rt, rows)
    add_screenings(rt, [("allow", 5000.0, now - timedelta(hours=30), 2)])  # outside the window
    with transaction(rt.sessions) as db:
        db.add(
            IndexSnapshot(
                version=3,
                encoder_id="e",
                key_id="k",
                sha256="0" * 64,
                path="x.snapshot",
                entry_count=7,
                created_at=now - timedelta(hours=2),
            )
        )
        db.add(
            ErasureRequest(
                subject_ref="a" * 64, requested_by="dpo", received_at=now - timedelta(days=26)
            )
        )
        db.add(
            ErasureRequest(
                subject_ref="b" * 64, requested_by="dpo", received_at=now - timedelta(days=3)
            )
        )
        db.add(
            ErasureRequest(
                subject_ref="c" * 64,
                requested_by="dpo",
                received_at=now - timedelta(days=40),
                completed_at=now - timedelta(days=39),
                state="done",
            )
        )
    with rt.sessions() as db:
        stats = dashboard_stats(db, hours=24, now=now)
    assert len(stats.screenings) == 24
    assert stats.screenings[-1].start == datetime(2026, 3, 1, 12, tzinfo=UTC)
    by_hour = {b.start.hour: b.counts for b in stats.screenings if b.total}
    assert by_hour == {
        12: {"allow": 50, "review": 0, "block": 0, "unscannable": 0},
        11: {"allow": 0, "review": 0, "block": 30, "unscannable": 0},
        9: {"allow": 0, "review": 15, "block": 0, "unscannable": 0},
        13: {"allow": 0, "review": 0, "block": 0, "unscannable": 5},  # yesterday 13:00
    }
    assert stats.latency_samples == 100
    assert stats.latency_p50_ms == pytest.approx(float(np.percentile(totals, 50)))
    assert stats.latency_p99_ms == pytest.approx(float(np.percentile(totals, 99)))
    assert stats.index_version == 3 and stats.index_entries == 7
    assert stats.index_age_s == pytest.approx(7200)
    assert stats.latest_screening_version == 2
    assert stats.index_stale is False  # the newest screening predates the snapshot
    assert [round(r.age_days) for r in stats.overdue_erasures] == [26]

    add_screenings(rt, [("allow", 10.0, now - timedelta(minutes=1), 2)])
    with rt.sessions() as db:
        assert dashboard_stats(db, now=now).index_stale is True  # still on v2 long after v3


def test_queue_and_review_throughput(
    console_runtime: Runtime, make_user: Callable[..., Any], make_review_item: Callable[..., int]
) -> None:
    from moderation.governance.review import claim_next
    from moderation.governance.review_decisions import decide

    rt = console_runtime
    reviewer = make_user("reviewer")
    items = [make_review_item() for _ in range(3)]
    old = datetime.now(UTC) - timedelta(hours=5)
    with transaction(rt.sessions) as db:
        from moderation.storage.models import ReviewItem

        db.execute(update(ReviewItem).where(ReviewItem.id == items[2]).values(created_at=old))
    for decision in ("confirm", "escalate"):
        with transaction(rt.sessions) as db:
            item = claim_next(db, reviewer_id=reviewer.id, lease_seconds=60, daily_limit=10)
            assert item is not None
            item_id = item.id
        decide(rt, item_id, reviewer_id=reviewer.id, decision=decision)
    with rt.sessions() as db:
        stats = dashboard_stats(db)
    assert (stats.queue.open, stats.queue.escalated, stats.queue.depth) == (1, 1, 2)
    assert stats.queue.oldest_age_s is not None and stats.queue.oldest_age_s < 3600
    assert stats.reviews[-1].counts == {"confirm": 1, "not_a_match": 0, "escalate": 1}


def test_dashboard_page_draws_inline_svg(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    now = datetime.now(UTC)
    add_screenings(console_runtime, [("block", 12.0, now, 1), ("allow", 8.0, now, 1)])
    client.login(make_user("auditor"))
    page = client.get("/dashboard")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count("<svg") == 2
    assert 'class="series-block"' in html and 'class="series-allow"' in html
    assert "style=" not in html and "<script>" not in html  # CSP: no inline style or script
    assert "p50 10.0 ms" in html
    assert 'id="queue-depth">0<' in html


def test_dashboard_shows_the_latest_canary_run_and_drift_scores(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    from moderation.storage.modelops import CanaryRun, DriftRun

    with transaction(console_runtime.sessions) as db:
        db.add(
            CanaryRun(
                reason="snapshot",
                encoder_id="timm/efficientnet_lite0|sha256=abc",
                fingerprint="f" * 64,
                figures={
                    "recall_review": 0.83,
                    "recall_block": 0.7,
                    "false_positive_rate": 0.0,
                    "micro_ap": 0.9,
                    "failures": ["recall at review 0.8300 < min_recall 0.95"],
                },
                passed_slo=False,
            )
        )
        db.add(DriftRun(signal="nearest_cosine", score=0.31, threshold=0.25, details={}))
    client.login(make_user("auditor"))
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'id="model-health"' in html
    assert "timm/efficientnet_lite0</td>" in html and "<td>0.83</td>" in html
    assert "missed: recall at review 0.8300 &lt; min_recall 0.95" in html
    assert '<td class="warn">0.310</td>' in html
    assert "style=" not in html
