"""Explainable matches (issue 15, item 5): per match, which signals agreed and which stage
decided, the same in ``moderation screen``'s JSON, the API result and the callback body.

Real photos through the real encoder: a block bank of two scikit-image photos and a hash-list
bank (one file's MD5, one photo's PDQ). The screen JSON comes from
:func:`moderation.service.operations.screen_paths` (what ``moderation screen --json`` prints);
the API result from ``GET /api/v1/screenings/<id>`` after a worker screened the POSTed upload
(:func:`moderation.service.queue.process_upload`); the callback from the body a local receiver
got (:func:`moderation.service.callbacks.deliver_callback`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from admin import create_app
from moderation.banks.hash_import import import_hash_list
from moderation.banks.operations import import_bank
from moderation.banks.records import EntryInfo, create_bank
from moderation.config import load_settings
from moderation.governance.review_display import item_view
from moderation.matching.candidates import Candidate
from moderation.matching.classifier.features import FEATURE_NAMES
from moderation.matching.classifier.model import CopyModel
from moderation.matching.classifier.stage import ClassifierStage
from moderation.matching.decision import policy_matches
from moderation.matching.explain import MATCH_STAGES, match_explanation, result_decided_by
from moderation.matching.policy import parse_policy
from moderation.matching.screening import Screener
from moderation.service.api_clients import create_api_client
from moderation.service.callback_urls import callback_policy
from moderation.service.callbacks import deliver_callback
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.operations import screen_paths
from moderation.service.queue import process_upload
from moderation.service.results import match_json, result_json
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.service.uploads import create_upload
from moderation.signals.pdq import pdq_hash
from moderation.signals.vpdq import VpdqMatch
from moderation.storage.db import transaction
from moderation.storage.models import (
    Bank,
    CallbackDelivery,
    Match,
    ReviewItem,
    Screening,
)
from tests.conftest import skimage_photo, skimage_photo_path
from tests.integration.queue_stack import CallbackReceiver
from tests.unit.test_screening import POLICY as SCREENING_POLICY

BANNED = ("astronaut", "chelsea")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def centre_crop(name: str, keep: float) -> bytes:
    """The middle ``keep`` (0-1) of each side of a photo, as JPEG."""
    image = skimage_photo(name)
    w, h = image.size
    box = (w * (1 - keep) / 2, h * (1 - keep) / 2, w * (1 + keep) / 2, h * (1 + keep) / 2)
    return jpeg(image.crop(tuple(int(v) for v in box)))


EXACT_FILE = jpeg(skimage_photo("rocket"))


@dataclass
class Env:
    runtime: Runtime
    client: Any  # the API's Flask test client
    plain: Screener  # global cosine, PDQ and exact hashes (no classifier model is active)
    classifier: Screener  # the same with the classifier stage of region_model


def region_model(encoder_id: str, dim: int) -> CopyModel:
    """A copy model that trusts the best region cosine alone: p = sigmoid(20 r - 14), so p is
    0.5 at r = 0.70 (the default policy's review_probability) and about 0.12 at r = 0.60."""
    n = len(FEATURE_NAMES)
    coef = np.zeros(n)
    coef[FEATURE_NAMES.index("region_to_region")] = 20.0
    return CopyModel(
        "region-only-1",
        encoder_id,
        FEATURE_NAMES,
        np.zeros(n),
        np.ones(n),
        coef,
        -14.0,
        1.0,
        0.0,
        np.zeros((0, dim), np.float32),
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("explained")
    settings = load_settings(data_dir=base / "var", callback_allow_loopback=True)
    runtime = prepared_runtime(settings)
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
        create_bank(session, "lists")
    import_bank(runtime, "known-bad", [skimage_photo_path(n) for n in BANNED], actor="test")
    listing = base / "list.txt"
    camera_pdq = pdq_hash(skimage_photo("camera")).hex
    listing.write_text(f"md5 {hashlib.md5(EXACT_FILE).hexdigest()}\npdq {camera_pdq}\n")
    import_hash_list(runtime, "lists", listing, actor="test")
    app = create_app(
        {"SETTINGS": settings, "TESTING": True, "MODERATION_DISPATCHER": RecordingDispatcher()}
    )
    model = region_model(str(runtime.encoder.id), runtime.encoder.dim)
    classifier = runtime.screener(refiner=ClassifierStage(model, runtime.encoder))
    yield Env(runtime, app.test_client(), runtime.screener(), classifier)
    runtime.engine.dispose()


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    server = CallbackReceiver()
    yield server
    server.close()


def three_outputs(
    env: Env, receiver: CallbackReceiver, path: Path, screener: Screener, name: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(screen JSON, API result, callback body's result) for one file."""
    rt = env.runtime
    rows: list[dict[str, Any]] = []
    screen_paths(rt, [path], on_result=rows.append, screener=screener)
    with transaction(rt.sessions) as session:
        created = create_api_client(
            session,
            rt.keyring,
            name,
            callback_allowlist=[receiver.prefix],
            policy=callback_policy(rt.settings),
        )
    auth = {"Authorization": f"Bearer {created.token}"}
    posted = env.client.post(
        "/api/v1/screenings",
        data={
            "image": (io.BytesIO(path.read_bytes()), path.name),
            "external_id": name,
            "subject_id": "user-1",
            "callback_url": f"{receiver.prefix}/{name}",
        },
        headers=auth,
        content_type="multipart/form-data",
    )
    assert posted.status_code == 202, posted.get_json()
    upload_id = posted.get_json()["id"]
    process_upload(rt, upload_id, lambda: screener, max_attempts=3)
    got = env.client.get(f"/api/v1/screenings/{upload_id}", headers=auth)
    assert got.status_code == 200
    with rt.sessions() as session:
        delivery_id = session.scalar(
            select(CallbackDelivery.id).where(CallbackDelivery.upload_id == upload_id)
        )
    assert delivery_id is not None
    assert deliver_callback(rt, delivery_id).state == "delivered"
    body = json.loads(receiver.received[-1][1])
    return rows[0], got.get_json()["result"], body["result"]


# name -> (the file's bytes, screened with the classifier stage, the stage that decides)
CASES: dict[str, tuple[Callable[[], bytes], bool, str]] = {
    "exact_copy": (lambda: EXACT_FILE, False, "exact_hash"),
    "cropped_copy": (lambda: centre_crop("astronaut", 0.7), False, "cosine"),
    "pdq_only": (lambda: jpeg(skimage_photo("camera")), False, "pdq"),
    # 40% of chelsea's sides: global cosine below review_cosine, an entry window close to it.
    "classifier": (lambda: centre_crop("chelsea", 0.4), True, "classifier"),
}


def _check_case(case: str, env: Env, top: dict[str, Any]) -> None:
    """What each case's top match must say about its signals."""
    rules = env.runtime.policy.rules_for("default")
    signals = top["signals"]
    if case == "exact_copy":
        assert signals["exact"] == {"kind": "md5", "agreed": True} and top["exact"] == "md5"
        assert signals["global_cosine"] is None and signals["pdq"] is None
    elif case == "cropped_copy":
        assert signals["global_cosine"]["passed"] == "block"
        assert signals["global_cosine"]["threshold"] == rules.block_cosine
        assert signals["global_cosine"]["agreed"] is True
        assert signals["global_cosine"]["value"] == top["cosine"] >= rules.block_cosine
        assert signals["classifier"] is None and signals["exact"] is None
    elif case == "pdq_only":
        assert signals["pdq"] == {
            "value": 0,
            "passed": "block",
            "threshold": rules.block_pdq_distance,
            "agreed": True,
        }
        assert signals["global_cosine"] is None  # a hash-list entry has no embedding
    else:
        assert signals["global_cosine"]["passed"] == "none"  # cosine alone would allow
        assert signals["global_cosine"]["agreed"] is False
        assert signals["classifier"]["passed"] in ("review", "block")
        assert signals["classifier"]["agreed"] is True
        region = signals["region_cosine"]
        assert region["kind"] == "entry_window" and region["agreed"] is True
        assert region["value"] > signals["global_cosine"]["value"]
    assert signals["frame"] == (None if case == "exact_copy" else 0)


@pytest.mark.parametrize("case", CASES)
def test_screen_api_and_callback_explain_a_match_alike(
    env: Env, receiver: CallbackReceiver, tmp_path: Path, case: str
) -> None:
    make, classified, stage = CASES[case]
    path = tmp_path / f"{case}.jpg"
    path.write_bytes(make())
    screener = env.classifier if classified else env.plain
    screen, api, callback = three_outputs(env, receiver, path, screener, case)
    assert screen["decision"] == api["decision"] == callback["decision"] != "allow"
    assert screen["decided_by"] == api["decided_by"] == callback["decided_by"] == stage
    # The same match objects, bank and label included (the operator's and the owner's view).
    assert screen["matches"] == api["matches"] == callback["matches"]
    top = api["matches"][0]
    assert top["decided_by"] == stage and top["level"] == api["decision"]
    _check_case(case, env, top)
    # Every field is in the OpenAPI document's schemas.
    schemas = env.client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    assert set(top) <= set(schemas["Match"]["properties"])
    assert set(top["signals"]) <= set(schemas["MatchSignals"]["properties"])
    assert api["decided_by"] in schemas["Result"]["properties"]["decided_by"]["enum"]


def test_the_review_page_shows_the_api_explanation(
    env: Env, receiver: CallbackReceiver, tmp_path: Path
) -> None:
    path = tmp_path / "review.jpg"
    path.write_bytes(CASES["classifier"][0]())
    _, api, _ = three_outputs(env, receiver, path, env.classifier, "reviewed")
    assert api["decision"] == "review"
    rt = env.runtime
    with rt.sessions() as session:
        item_id = session.scalar(select(ReviewItem.id).order_by(ReviewItem.id.desc()))
        assert item_id is not None
        view = item_view(session, item_id, rt.keyring)
    assert view is not None and view.screening_decided_by == api["decided_by"]
    shown = view.matches[0]
    assert (shown.decided_by, shown.level) == (api["matches"][0]["decided_by"], "review")
    assert shown.evidence == api["matches"][0]["signals"]


def test_another_tenants_match_keeps_its_signals_but_not_its_identity(
    env: Env, tmp_path: Path
) -> None:
    rt = env.runtime
    path = tmp_path / "crop.jpg"
    path.write_bytes(centre_crop("astronaut", 0.7))
    rows: list[dict[str, Any]] = []
    screen_paths(rt, [path], on_result=rows.append, screener=env.plain)
    with transaction(rt.sessions) as session:
        other = create_api_client(session, rt.keyring, "other-tenant").client_id
        bank = session.scalar(select(Bank).where(Bank.name == "known-bad"))
        assert bank is not None
        bank.shared_with_all = False  # known-bad no longer applies to the other tenant
    try:
        with rt.sessions() as session:
            screening = session.scalar(
                select(Screening).where(Screening.upload_id == rows[0]["upload_id"])
            )
            assert screening is not None
            shown = result_json(session, screening, rt.keyring, other)
    finally:
        with transaction(rt.sessions) as session:
            bank = session.scalar(select(Bank).where(Bank.name == "known-bad"))
            assert bank is not None
            bank.shared_with_all = True
    [mine] = rows[0]["matches"]
    [theirs] = shown["matches"]
    assert (theirs["bank"], theirs["entry_id"], theirs["label"]) == (None, None, None)
    named = ("bank", "entry_id", "label")
    assert {k: v for k, v in theirs.items() if k not in named} == {
        k: v for k, v in mine.items() if k not in named
    }
    assert theirs["decided_by"] == shown["decided_by"] == "cosine"
    text = json.dumps(shown)
    assert "known-bad" not in text and "astronaut" not in text and mine["entry_id"] not in text


@pytest.mark.parametrize(
    ("stored", "decided_by", "cosine_view"),
    [
        # Stored before the evidence: agreeing signals, level, frame only.
        (
            {"agreed": ["cosine"], "level": "review", "frame": 0},
            "cosine",
            {"value": 0.72, "passed": None, "threshold": None, "agreed": True},
        ),
        (
            {"agreed": ["global_cosine", "query_region", "classifier"], "level": "block"},
            "classifier",
            {"value": 0.72, "passed": None, "threshold": None, "agreed": True},
        ),
        # A row with no signals at all.
        ({}, None, {"value": 0.72, "passed": None, "threshold": None, "agreed": False}),
    ],
)
def test_rows_stored_before_the_evidence_still_render(
    env: Env, stored: dict[str, Any], decided_by: str | None, cosine_view: dict[str, Any]
) -> None:
    match = Match(cosine=0.72, pdq_distance=40, probability=None, signals=stored)
    shown = match_json(match, "known-bad", "a", named=True)
    assert shown["decided_by"] == decided_by and shown["level"] == stored.get("level")
    assert shown["decided_by"] in (*MATCH_STAGES, None)
    signals = shown["signals"]
    assert signals["global_cosine"] == cosine_view
    assert signals["pdq"] == {"value": 40, "passed": None, "threshold": None, "agreed": False}
    assert signals["classifier"] is None and signals["exact"] is None
    region = signals["region_cosine"]
    if "query_region" in stored.get("agreed", []):
        assert region == {"kind": "query_view", "value": None, "agreed": True}
    else:
        assert region is None
    assert shown == {
        "bank": "known-bad",
        "entry_id": None,
        "label": "a",
        **match_explanation(stored, cosine=0.72, pdq_distance=40, probability=None),
    }


def test_an_old_screening_renders_through_the_api_result(env: Env) -> None:
    """A screening and its match stored in the old form (agreeing signals, level, frame) get
    a result ``decided_by`` inferred from the top match."""
    rt = env.runtime
    with transaction(rt.sessions) as session:
        bank = session.scalar(select(Bank).where(Bank.name == "known-bad"))
        assert bank is not None
        upload = create_upload(
            session, None, keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir, status="done"
        )
        session.flush()
        screening = Screening(upload_id=upload.id, decision="block", policy="default")
        session.add(screening)
        session.flush()
        session.add(
            Match(
                screening_id=screening.id,
                bank_id=bank.id,
                cosine=0.99,
                signals={"agreed": ["cosine", "pdq"], "level": "block", "frame": 0},
            )
        )
        session.flush()
        shown = result_json(session, screening, rt.keyring)
    assert shown["decided_by"] == "cosine"
    assert shown["matches"][0]["signals"]["global_cosine"] == {
        "value": 0.99,
        "passed": None,
        "threshold": None,
        "agreed": True,
    }


# --- the deciding stage of each policy rule (synthetic candidates, no encoder) -----------------

# test_screening's policy, its default category with probability thresholds too.
STAGE_POLICY = parse_policy(
    {
        **SCREENING_POLICY,
        "categories": {
            "default": {
                **SCREENING_POLICY["categories"]["default"],  # type: ignore[dict-item]
                "block_probability": 0.9,
                "review_probability": 0.5,
            }
        },
    },
    source="test",
)


def _entry(quarantined: bool = False) -> EntryInfo:
    return EntryInfo(1, 1, "b", "block", "default", "label", quarantined=quarantined)


@pytest.mark.parametrize(
    ("candidate", "level", "stage", "inferred"),
    [
        (Candidate(_entry(), cosine=0.85, pdq_distance=25), "block", "cosine", "cosine"),
        # Both agree, PDQ reached the higher step: only the stored stage can say so.
        (Candidate(_entry(), cosine=0.7, pdq_distance=10), "block", "pdq", "cosine"),
        (Candidate(_entry(), cosine=0.3, pdq_distance=25), "review", "pdq", "pdq"),
        # Raised from nothing: the agreeing signals (none here) cannot tell.
        (Candidate(_entry(), cosine=0.5, probability=0.95), "block", "classifier", None),
        # The safety floor: a block-threshold cosine is not allowed whatever p says.
        (
            Candidate(_entry(), cosine=0.95, probability=0.1),
            "review",
            "classifier_band",
            "classifier_band",
        ),
        (Candidate(_entry(True), cosine=0.95), "review", "flood_control", "flood_control"),
        (Candidate(_entry(True), exact="sha256"), "review", "flood_control", "flood_control"),
        (Candidate(_entry(), exact="sha256"), "block", "exact_hash", "exact_hash"),
        # A video on a vPDQ entry (default thresholds: block 80 %, review 50 %).
        (Candidate(_entry(), vpdq=VpdqMatch(100.0, 75.0)), "block", "vpdq", "vpdq"),
        (Candidate(_entry(), vpdq=VpdqMatch(60.0, 100.0)), "review", "vpdq", "vpdq"),
    ],
)
def test_the_stage_that_set_the_level_is_named(
    candidate: Candidate, level: str, stage: str, inferred: str | None
) -> None:
    [match] = policy_matches(STAGE_POLICY, [candidate])
    shown = match.to_json()
    assert (shown["level"], shown["decided_by"]) == (level, stage)
    assert result_decided_by(level, None, [shown]) == stage
    # A row stored before the stage was: inferred from its agreeing signals.
    old = {"agreed": list(match.signals), "level": match.level, "frame": 0}
    again = match_explanation(
        old, cosine=match.cosine, pdq_distance=match.pdq_distance, probability=match.probability
    )
    assert again["decided_by"] == inferred


def test_results_without_a_deciding_match_name_their_stage() -> None:
    assert result_decided_by("allow", None, []) == "no_match"
    assert result_decided_by("allow", "allow_bank", []) == "allow_bank"
    assert result_decided_by("unscannable", "too_large", []) == "unscannable"
    weak = Candidate(_entry(), cosine=0.6)
    assert policy_matches(STAGE_POLICY, [weak]) == []


def test_a_signal_that_agreed_without_its_own_value_still_shows() -> None:
    # The classifier stage's PDQ agreed through a view of the upload; the candidate search
    # found no PDQ distance for the entry itself.
    stored = {"agreed": ["global_cosine", "pdq", "classifier"], "level": "block", "frame": 0}
    shown = match_explanation(stored, cosine=0.75, pdq_distance=None, probability=0.99)
    assert shown["signals"]["pdq"] == {
        "value": None,
        "passed": None,
        "threshold": None,
        "agreed": True,
    }
    assert shown["pdq_distance"] is None and shown["decided_by"] == "classifier"


def test_a_vpdq_match_shows_its_percentages_and_the_threshold_passed() -> None:
    [match] = policy_matches(STAGE_POLICY, [Candidate(_entry(), vpdq=VpdqMatch(100.0, 75.0))])
    shown = match.to_json()
    assert shown["vpdq"] == {"query_match_percent": 100.0, "compared_match_percent": 75.0}
    assert shown["signals"]["vpdq"] == {
        "value": 100.0,
        "compared": 75.0,
        "passed": "block",
        "threshold": 80.0,
        "agreed": True,
    }
    # The whole video matched: no frame, no time.
    assert shown["signals"]["frame"] is None and "timestamp_s" not in shown
