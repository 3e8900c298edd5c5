"""The console in real headless Chromium: sign in with TOTP, review three real screenings with
the keyboard only (image blurred until revealed), and import a bank zip in the background."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.governance.users import create_user, totp_code
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent, LabelledPair, ReviewItem, User
from tests.conftest import skimage_photo_path

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery staple"


def make_user(rt: Runtime, email: str, role: str, totp: bool) -> int:
    with transaction(rt.sessions) as db:
        return create_user(
            db, rt.keyring, email=email, role=role, password=PASSWORD, totp=totp, actor="test"
        ).user_id


def current_code(rt: Runtime, user_id: int) -> str:
    with rt.sessions() as db:
        user = db.get(User, user_id)
        assert user is not None
        return totp_code(rt.keyring, user)


def sign_in(page: Any, url: str, rt: Runtime, email: str, user_id: int) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(re.compile(r".*/login/totp$"))
    page.fill("input[name=code]", current_code(rt, user_id))
    page.press("input[name=code]", "Enter")
    page.wait_for_url(lambda u: "/login" not in u)


def image_filter(page: Any) -> str:
    return str(page.eval_on_selector("#upload-image", "e => getComputedStyle(e).filter"))


def press_and_wait(page: Any, key: str) -> None:
    with page.expect_navigation():
        page.keyboard.press(key)


def review_screenings(rt: Runtime, copies: dict[str, Path]) -> None:
    """A bank of four photos and the three edited copies screened into the review band."""
    with transaction(rt.sessions) as db:
        create_bank(db, "known")
    names = ("astronaut", "chelsea", "coffee", "rocket")
    import_bank(rt, "known", [skimage_photo_path(n) for n in names], actor="test")
    results: list[dict[str, Any]] = []
    screen_paths(rt, list(copies.values()), on_result=results.append)
    assert [r["decision"] for r in results] == ["review"] * 3, results


def test_review_three_items_with_the_keyboard(
    served: Any, page: Any, artifacts: Path, review_band_copies: dict[str, Path]
) -> None:
    rt = served.runtime
    review_screenings(rt, review_band_copies)
    reviewer = make_user(rt, "reviewer@example.org", "reviewer", totp=True)
    sign_in(page, served.url, rt, "reviewer@example.org", reviewer)
    assert page.url.endswith("/review")

    press_and_wait(page, "s")  # start reviewing
    first = page.url
    assert re.search(r"/review/\d+$", first)
    page.wait_for_function("document.getElementById('upload-image').complete")
    blurred = image_filter(page)
    assert "blur(" in blurred and "grayscale(1)" in blurred, blurred
    assert "upload blurred" in page.get_attribute("#upload-image", "class")  # type: ignore[operator]
    page.screenshot(path=str(artifacts / "review-1-blurred.png"), full_page=True)

    press_and_wait(page, "r")  # reveal (audited)
    page.wait_for_function("document.getElementById('upload-image').complete")
    assert image_filter(page) == "none"
    assert "variant=full" in page.get_attribute("#upload-image", "src")  # type: ignore[operator]
    width = page.eval_on_selector("#upload-image", "e => e.naturalWidth")
    assert width > 96  # the revealed image, not the small preview
    page.screenshot(path=str(artifacts / "review-2-revealed.png"), full_page=True)

    press_and_wait(page, "c")  # confirm: block
    second = page.url
    assert second != first and re.search(r"/review/\d+$", second)
    assert "blur(" in image_filter(page)  # a new item starts blurred again
    page.screenshot(path=str(artifacts / "review-3-second-item.png"), full_page=True)
    press_and_wait(page, "a")  # not a match: allow
    third = page.url
    assert third not in (first, second)
    press_and_wait(page, "e")  # escalate
    assert page.url.endswith("/review")
    assert "The queue is empty" in page.content()
    page.screenshot(path=str(artifacts / "review-4-queue-empty.png"), full_page=True)
    assert not page.console_errors, page.console_errors  # no CSP violations, no script errors

    ids = [int(u.rsplit("/", 1)[1]) for u in (first, second, third)]
    with rt.sessions() as db:
        rows = {r.id: r for r in db.scalars(select(ReviewItem))}
        assert [(rows[i].state, rows[i].decision, rows[i].decided_by) for i in ids] == [
            ("decided", "confirm", reviewer),
            ("decided", "not_a_match", reviewer),
            ("escalated", "escalate", reviewer),
        ]
        assert (
            len(db.scalars(select(LabelledPair).where(LabelledPair.source == "review")).all()) == 2
        )
        reveals = db.scalars(select(AuditEvent).where(AuditEvent.action == "review.reveal")).all()
        assert [(e.actor, e.target) for e in reveals] == [
            (f"user:{reviewer}", f"review_item:{ids[0]}")
        ]


def test_import_a_bank_zip_and_see_its_entries(
    served: Any, page: Any, artifacts: Path, tmp_path: Path
) -> None:
    rt = served.runtime
    admin = make_user(rt, "admin@example.org", "admin", totp=True)
    sign_in(page, served.url, rt, "admin@example.org", admin)
    assert page.url.endswith("/dashboard")

    page.goto(f"{served.url}/banks")
    page.fill("#create-bank input[name=name]", "known-bad")
    page.fill("#create-bank input[name=category]", "default")
    with page.expect_navigation():
        page.press("#create-bank input[name=category]", "Enter")
    assert re.search(r"/banks/\d+$", page.url)
    bank_url = page.url

    archive = tmp_path / "bank.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("astronaut", "chelsea", "coffee"):
            bundle.writestr(f"set/{name}.png", skimage_photo_path(name).read_bytes())
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(buffer, "PNG")
        bundle.writestr("set/<img src=x onerror=alert(1)>.png", b"not really a png")
    page.set_input_files("#import-form input[type=file]", str(archive))
    with page.expect_navigation():
        page.click("#import-form button[type=submit]")
    assert "/banks/jobs/" in page.url
    page.screenshot(path=str(artifacts / "import-1-job.png"), full_page=True)
    page.wait_for_selector('#job-state[data-state="done"]', timeout=180_000)
    assert "Added 3 entries; skipped 1." in page.inner_text("#job-result")
    assert page.locator("text=<img src=x onerror=alert(1)>.png").count() == 1  # shown as text
    page.screenshot(path=str(artifacts / "import-2-done.png"), full_page=True)

    with page.expect_navigation():
        page.click("#bank-link")
    assert page.url == bank_url
    labels = page.locator("#entries td.label").all_inner_texts()
    assert sorted(labels) == ["astronaut", "chelsea", "coffee"]
    assert page.inner_text("#entry-count") == "3"
    page.screenshot(path=str(artifacts / "import-3-entries.png"), full_page=True)
    assert not page.console_errors, page.console_errors
