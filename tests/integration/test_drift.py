"""Drift monitoring (issue 18 item 3) on real screenings: a stable hour stays below every
threshold; a colour-inverted batch (a preprocessing bug) and a flood of one image raise the
scores above them; the scores are stored and exported."""

from __future__ import annotations

import io
import random
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image, ImageFilter
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import update

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.config import Settings, load_settings
from moderation.matching.classifier.synthetic import background_images
from moderation.modelops.drift import THRESHOLDS, run_drift
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.storage.models import Screening
from tests.conftest import SKIMAGE_PHOTOS, migrated_runtime, skimage_photo_path

pytestmark = pytest.mark.slow  # real encoder weights, ~200 screenings


@pytest.fixture
def banked(settings: Settings, tmp_path: Path) -> Iterator[Runtime]:
    """A runtime (classifier stage and golden set off: drift only) with the six scikit-image
    photos in bank ``known-bad``."""
    quick = load_settings(
        data_dir=settings.data_dir,
        classifier=False,
        canary_edits_per_entry=0,
        canary_negatives_per_entry=0,
    )
    with migrated_runtime(quick) as runtime:
        with runtime.sessions() as session, session.begin():
            create_bank(session, "known-bad")
        folder = tmp_path / "banned"
        folder.mkdir()
        for name in SKIMAGE_PHOTOS:
            shutil.copy(skimage_photo_path(name), folder / skimage_photo_path(name).name)
        import_bank(runtime, "known-bad", [folder], actor="test")
        yield runtime


def traffic(folder: Path, seed: int, n: int, *, blur: bool = False) -> list[Path]:
    """``n`` uploads like a platform's: scikit-image photos (banked or not), each randomly
    cropped and resized and saved as JPEG; ``blur``: heavily blurred (Gaussian radius 8, a
    preprocessing bug upstream). (A colour-inverted batch does not move this encoder's
    cosines: measured nearest-cosine mean 0.535 against 0.538 unedited, 40 uploads.)"""
    pool = background_images(None)
    rng = random.Random(seed)
    folder.mkdir()
    paths = []
    for i in range(n):
        image = rng.choice(pool)
        w, h = image.size
        f = rng.uniform(0.8, 0.95)
        dx, dy = rng.randint(0, round(w * (1 - f))), rng.randint(0, round(h * (1 - f)))
        image = image.crop((dx, dy, dx + round(w * f), dy + round(h * f)))
        image.thumbnail((rng.randint(256, 400),) * 2)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(8))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=rng.randint(70, 90))
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(out.getvalue())
    return paths


def screen_at(runtime: Runtime, paths: list[Path], when: datetime) -> None:
    """Screen ``paths`` (results recorded), then date their results ``when``."""
    ids = [r["upload_id"] for r in _screen(runtime, paths)]
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(Screening).where(Screening.upload_id.in_(ids)).values(created_at=when)
        )


def _screen(runtime: Runtime, paths: list[Path]) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []
    screen_paths(runtime, paths, on_result=seen.append)
    return seen


def test_a_stable_hour_stays_below_and_a_shift_or_flood_goes_above(
    banked: Runtime, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    screen_at(banked, traffic(tmp_path / "reference", 1, 90), now - timedelta(hours=5))
    screen_at(banked, traffic(tmp_path / "stable", 2, 60), now - timedelta(hours=3, minutes=30))
    stable = run_drift(banked, actor="test", now=now - timedelta(hours=3))
    scores = {s.signal: s.score for s in stable.signals}
    assert not stable.drifted, scores
    assert all(not s.details.get("insufficient") for s in stable.signals)

    # A preprocessing bug: the next hour's uploads arrive heavily blurred.
    screen_at(
        banked,
        traffic(tmp_path / "blurred", 3, 60, blur=True),
        now - timedelta(hours=2, minutes=30),
    )
    shifted = run_drift(banked, actor="test", now=now - timedelta(hours=2))
    drifted = {s.signal: s for s in shifted.signals}
    assert drifted["decision_rates"].drifted, drifted["decision_rates"]
    assert drifted["nearest_cosine"].drifted, drifted["nearest_cosine"]
    assert drifted["nearest_cosine"].score > THRESHOLDS["nearest_cosine"]

    # A flood: one banked photo uploaded 60 times in the last hour.
    flood = tmp_path / "flood"
    flood.mkdir()
    one = Image.open(skimage_photo_path("coffee")).convert("RGB")
    paths = []
    for i in range(60):
        paths.append(flood / f"{i}.jpg")
        one.save(paths[-1], "JPEG", quality=80 + i % 10)
    screen_at(banked, paths, now - timedelta(minutes=30))
    flooded = {s.signal: s for s in run_drift(banked, actor="test", now=now).signals}
    assert flooded["decision_rates"].drifted, flooded["decision_rates"]
    assert "block/default/known-bad" in flooded["decision_rates"].details["moved"]

    from moderation.modelops.gauges import ModelOpsCollector

    registry = CollectorRegistry()
    registry.register(ModelOpsCollector(banked))
    text = generate_latest(registry).decode()
    score = flooded["decision_rates"].score
    assert f'moderation_drift_score{{signal="decision_rates"}} {score}' in text
    assert 'moderation_drift_threshold{signal="decision_rates"} 0.2' in text
