"""Review pages: blurred greyscale preview until an audited reveal (W9), escaped untrusted text
(I9), decisions and navigation through the queue."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from moderation.service.runtime import Runtime
from moderation.storage.console import ReviewerExposure
from moderation.storage.models import AuditEvent, LabelledPair, ReviewItem

SCRIPT = '<script>alert("x")</script>'


def count(rt: Runtime, action: str) -> int:
    with rt.sessions() as db:
        return int(
            db.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
            )
            or 0
        )


@pytest.fixture
def reviewer(client: Any, make_user: Callable[..., Any]) -> Any:
    """A reviewer, signed in on ``client``."""
    user = make_user("reviewer")
    client.login(user)
    return user


def start(client: Any) -> Any:
    """Press "Start reviewing" on the queue page; returns the redirect."""
    response = client.form("/review/claim", {"queue": "main"}, token_from="/review")
    assert response.status_code == 302
    return response


def test_w9_image_is_blurred_greyscale_until_an_audited_reveal(
    client: Any,
    reviewer: Any,
    make_review_item: Callable[..., int],
    console_runtime: Runtime,
) -> None:
    item = make_review_item()
    assert start(client).headers["Location"] == f"/review/{item}"
    page = client.get(f"/review/{item}").get_data(as_text=True)
    assert 'class="upload blurred"' in page
    assert f"/review/{item}/image?variant=preview" in page
    assert "variant=full" not in page

    preview = client.get(f"/review/{item}/image?variant=preview")
    assert preview.status_code == 200 and preview.mimetype == "image/jpeg"
    assert "no-store" in preview.headers["Cache-Control"]
    with Image.open(io.BytesIO(preview.data)) as img:
        assert img.mode == "L" and max(img.size) <= 96
    # The full image is refused until the reveal is recorded.
    assert client.get(f"/review/{item}/image?variant=full").status_code == 403
    assert count(console_runtime, "review.reveal") == 0

    revealed = client.form(
        f"/review/{item}/act", {"action": "reveal"}, token_from=f"/review/{item}"
    )
    assert revealed.status_code == 302
    assert count(console_runtime, "review.reveal") == 1
    page = client.get(f"/review/{item}").get_data(as_text=True)
    assert 'class="upload"' in page and "blurred" not in page.split('id="upload-image"')[1][:200]
    full = client.get(f"/review/{item}/image?variant=full")
    assert full.status_code == 200
    with Image.open(io.BytesIO(full.data)) as img:
        assert img.mode == "RGB" and max(img.size) > 96
    with console_runtime.sessions() as db:
        exposure = db.scalars(select(ReviewerExposure)).one()
        assert (exposure.user_id, exposure.items, exposure.reveals) == (reviewer.id, 1, 1)
    assert "1</strong> of 200 items shown, 1 image revealed" in page


@pytest.mark.usefixtures("reviewer")
def test_i9_untrusted_text_is_escaped(client: Any, make_review_item: Callable[..., int]) -> None:
    item = make_review_item(
        external_id=f"{SCRIPT}.jpg'; DROP TABLE uploads;--",
        description=f"{SCRIPT}<img src=x onerror=alert(1)>",
        label=f"{SCRIPT}label",
    )
    start(client)
    page = client.get(f"/review/{item}").get_data(as_text=True)
    assert SCRIPT not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;.jpg&#39;; DROP TABLE uploads;--" in page
    assert (
        "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    )
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;label" in page
    # Parameterised SQL: the upload row and its text survived as data.
    assert client.get(f"/review/{item}/image?variant=preview").status_code == 200


@pytest.mark.usefixtures("reviewer")
def test_item_page_explains_each_signal_and_the_deciding_stage(
    client: Any, make_review_item: Callable[..., int]
) -> None:
    # make_review_item stores a match in the old form (agreeing signals, level, frame only):
    # cosine 0.72 agreed, PDQ distance 40 measured but not agreeing.
    item = make_review_item()
    start(client)
    page = client.get(f"/review/{item}").get_data(as_text=True)
    assert '<dd id="decided-by">cosine</dd>' in page
    table = page.split('<table class="matches">')[1].split("</table>")[0]
    assert '<li class="agreed">cosine 0.72 &#10003;</li>' in table
    assert '<li class="not-agreed">PDQ distance 40</li>' in table
    assert "<td>cosine</td>" in table  # the match's deciding stage


@pytest.mark.usefixtures("reviewer")
def test_decisions_move_through_the_queue(
    client: Any, make_review_item: Callable[..., int], console_runtime: Runtime
) -> None:
    items = [make_review_item(priority=p) for p in (90, 80, 70)]
    assert start(client).headers["Location"] == f"/review/{items[0]}"
    location = f"/review/{items[0]}"
    decided = []
    for decision in ("confirm", "not_a_match", "escalate"):
        item_id = int(location.rsplit("/", 1)[1])
        response = client.form(f"{location}/act", {"action": decision}, token_from=location)
        assert response.status_code == 302
        decided.append((item_id, decision))
        location = response.headers["Location"]
    assert location == "/review"  # the queue is empty
    assert [i for i, _ in decided] == items
    with console_runtime.sessions() as db:
        rows = {r.id: r for r in db.scalars(select(ReviewItem))}
        assert [(rows[i].state, rows[i].decision) for i in items] == [
            ("decided", "confirm"),
            ("decided", "not_a_match"),
            ("escalated", "escalate"),
        ]
        assert len(db.scalars(select(LabelledPair)).all()) == 2
    assert count(console_runtime, "review.decide") == 3
    # "Previous" leads to the items this reviewer decided, read-only.
    page = client.get(f"/review/{items[1]}").get_data(as_text=True)
    assert "Read only" in page and f'href="/review/{items[0]}" data-key="k"' in page
    # Someone else's item is not visible to this reviewer.
    other = make_review_item()
    assert client.get(f"/review/{other}").status_code == 403


def test_skip_offers_the_next_item_and_a_lost_claim_is_reported(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
) -> None:
    first, second = make_user("reviewer"), make_user("reviewer")
    a = make_review_item(priority=90)
    b = make_review_item(priority=10)
    client.login(first)
    start(client)
    skipped = client.form(f"/review/{a}/act", {"action": "skip"}, token_from=f"/review/{a}")
    assert skipped.headers["Location"] == f"/review/{b}"
    other = new_client()
    other.login(second)
    assert start(other).headers["Location"] == f"/review/{a}"
    # First cannot act on a, which is now second's.
    refused = client.post(
        f"/review/{a}/act", data={"action": "confirm", "csrf_token": client.token(f"/review/{b}")}
    )
    assert refused.status_code == 403


def test_exposure_limit_is_shown_and_stops_the_queue(
    make_app: Callable[..., Any],
    client_for: Callable[[Any], Any],
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
) -> None:
    app = make_app(review_daily_exposure_limit=1)
    client = client_for(app)
    reviewer = make_user("reviewer")
    first = make_review_item()
    make_review_item()
    client.login(reviewer)
    start(client)
    client.form(f"/review/{first}/act", {"action": "not_a_match"}, token_from=f"/review/{first}")
    queue = client.get("/review").get_data(as_text=True)
    assert "Daily limit reached" in queue
    again = start(client)
    assert again.headers["Location"] == "/review"
    assert "today&#39;s limit" in client.get("/review").get_data(as_text=True)


def test_admin_works_the_escalated_queue(
    client: Any,
    new_client: Callable[[], Any],
    make_user: Callable[..., Any],
    make_review_item: Callable[..., int],
) -> None:
    reviewer, admin = make_user("reviewer"), make_user("admin")
    item = make_review_item()
    client.login(reviewer)
    start(client)
    client.form(f"/review/{item}/act", {"action": "escalate"}, token_from=f"/review/{item}")
    refused = client.form("/review/claim", {"queue": "escalated"}, token_from="/review")
    assert refused.status_code == 403
    boss = new_client()
    boss.login(admin)
    taken = boss.form("/review/claim", {"queue": "escalated"}, token_from="/review")
    assert taken.headers["Location"] == f"/review/{item}"
    page = boss.get(f"/review/{item}").get_data(as_text=True)
    assert 'value="escalate"' not in page
    done = boss.form(f"/review/{item}/act", {"action": "confirm"}, token_from=f"/review/{item}")
    assert done.status_code == 302
