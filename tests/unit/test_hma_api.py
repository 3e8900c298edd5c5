"""The HMA-compatible API (``/hma``) through Flask's test client, over a hash-list bank."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select

from admin import create_app
from moderation.banks.hash_import import import_hash_list
from moderation.banks.records import create_bank
from moderation.config import load_settings
from moderation.media.decode import decode_image
from moderation.service.api_clients import create_api_client
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.runtime import Runtime
from moderation.signals.pdq import pdq_hash
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent
from tests.conftest import skimage_photo

BANK = "known_bad"


def jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    skimage_photo(name).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def pdq_of(data: bytes) -> str:
    return pdq_hash(decode_image(data).frames[0]).hex


def flip_bits(hex_digest: str, bits: int) -> str:
    value = int(hex_digest, 16)
    for bit in range(bits):
        value ^= 1 << (bit * 37 % 256)
    return f"{value:064x}"


@pytest.fixture
def app(runtime: Runtime) -> Flask:
    settings = load_settings(data_dir=runtime.settings.data_dir, api_rate_limit="1000/minute")
    return create_app(
        {"SETTINGS": settings, "TESTING": True, "MODERATION_DISPATCHER": RecordingDispatcher()}
    )


@pytest.fixture
def auth(runtime: Runtime) -> dict[str, str]:
    with transaction(runtime.sessions) as session:
        created = create_api_client(session, runtime.keyring, "acme")
    return {"Authorization": f"Bearer {created.token}"}


@pytest.fixture
def coffee() -> bytes:
    return jpeg("coffee")


@pytest.fixture
def bank(runtime: Runtime, coffee: bytes, tmp_path: Path) -> str:
    """A bank holding the coffee photo's PDQ digest, imported from a hash list."""
    with transaction(runtime.sessions) as session:
        create_bank(session, BANK)
    listing = tmp_path / "list.txt"
    listing.write_text(f"pdq {pdq_of(coffee)}\n")
    import_hash_list(runtime, BANK, listing, actor="test")
    return BANK


def entry_id(client: FlaskClient, auth: dict[str, str], pdq: str) -> int:
    response = client.get(f"/hma/m/raw_lookup?signal_type=pdq&signal={pdq}", headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    matches = response.get_json()["matches"]
    assert len(matches) == 1
    return int(matches[0])


def test_raw_lookup_exact_near_and_unrelated(
    app: Flask, auth: dict[str, str], bank: str, coffee: bytes
) -> None:
    client = app.test_client()
    pdq = pdq_of(coffee)
    eid = entry_id(client, auth, pdq)
    near = client.get(
        f"/hma/m/raw_lookup?signal_type=pdq&signal={flip_bits(pdq, 5)}&include_distance=true",
        headers=auth,
    )
    assert near.get_json() == {"matches": [{"bank_content_id": eid, "distance": "5"}]}
    other = pdq_of(jpeg("rocket"))
    unrelated = client.get(f"/hma/m/raw_lookup?signal_type=pdq&signal={other}", headers=auth)
    assert unrelated.status_code == 200 and unrelated.get_json() == {"matches": []}
    # Lookups never build the encoder (nor load torch) in the web process.
    assert "encoder" not in vars(app.extensions["moderation"])


def test_lookup_groups_matches_by_bank(
    app: Flask, auth: dict[str, str], bank: str, coffee: bytes
) -> None:
    client = app.test_client()
    pdq = pdq_of(coffee)
    eid = entry_id(client, auth, pdq)
    exact = client.get(f"/hma/m/lookup?signal_type=pdq&signal={pdq}", headers=auth)
    assert exact.get_json() == {bank: [{"bank_content_id": eid, "distance": "0"}]}
    near = client.get(f"/hma/m/lookup?signal_type=pdq&signal={flip_bits(pdq, 3)}", headers=auth)
    assert near.get_json() == {bank: [{"bank_content_id": eid, "distance": "3"}]}
    elsewhere = client.get(f"/hma/m/lookup?signal_type=pdq&signal={pdq}&banks=other", headers=auth)
    assert elsewhere.get_json() == {}
    unrelated = client.get(
        f"/hma/m/lookup?signal_type=pdq&signal={pdq_of(jpeg('rocket'))}", headers=auth
    )
    assert unrelated.status_code == 200 and unrelated.get_json() == {}


def test_lookup_post_hashes_the_upload(
    app: Flask, auth: dict[str, str], bank: str, coffee: bytes
) -> None:
    client = app.test_client()
    eid = entry_id(client, auth, pdq_of(coffee))
    response = client.post(
        "/hma/m/lookup",
        data={"photo": (io.BytesIO(coffee), "coffee.jpg")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["pdq"] == {bank: [{"bank_content_id": eid, "distance": "0"}]}
    assert body["md5"] == {} and body["sha256"] == {}


def test_hash_returns_pdq_and_exact_hashes(app: Flask, auth: dict[str, str]) -> None:
    import hashlib

    data = jpeg("chelsea")
    response = app.test_client().post(
        "/hma/h/hash",
        data={"photo": (io.BytesIO(data), "chelsea.jpg")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {
        "pdq": pdq_hash(Image.open(io.BytesIO(data)).convert("RGB")).hex,
        "md5": hashlib.md5(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    only_pdq = app.test_client().post(
        "/hma/h/hash?types=pdq",
        data={"photo": (io.BytesIO(data), "chelsea.jpg")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert only_pdq.get_json() == {"pdq": pdq_of(data)}


def test_hash_of_a_video_is_its_vpdq_signal(app: Flask, auth: dict[str, str]) -> None:
    import hashlib

    from moderation.matching.video import decode_video_upload
    from moderation.media.video import VideoLimits
    from moderation.signals.vpdq import parse_signal_str, to_signal_str
    from tests.video_clips import clip, photo

    data = clip([(photo("astronaut"), 1.0), (photo("rocket"), 1.0)], "webm")
    client = app.test_client()

    def post(query: str = "") -> Any:
        return client.post(
            f"/hma/h/hash{query}",
            data={"video": (io.BytesIO(data), "clip.webm")},
            headers=auth,
            content_type="multipart/form-data",
        )

    body = post().get_json()
    expected = decode_video_upload(data, VideoLimits()).vpdq
    assert body["vpdq"] == to_signal_str(expected)
    assert [f.timestamp for f in parse_signal_str(body["vpdq"])] == [0.0, 1.0]
    assert body["md5"] == hashlib.md5(data).hexdigest()
    assert set(body) == {"vpdq", "md5", "sha1", "sha256"}
    assert set(post("?types=vpdq").get_json()) == {"vpdq"}
    refused = post("?types=pdq")
    assert refused.status_code == 400 and "pdq" in refused.get_json()["message"]


def test_hash_refuses_other_fields_and_garbage(app: Flask, auth: dict[str, str]) -> None:
    client = app.test_client()
    for form, status in (
        ({"video": (io.BytesIO(b"x"), "v.mp4")}, 400),
        ({"audio": (io.BytesIO(b"x"), "a.mp3")}, 400),
        ({"photo": (io.BytesIO(b"not an image"), "x.jpg")}, 400),
        ({}, 400),
    ):
        response = client.post(
            "/hma/h/hash", data=form, headers=auth, content_type="multipart/form-data"
        )
        assert response.status_code == status
        assert set(response.get_json()) == {"message"}


def test_add_signal_then_lookup_finds_it_and_audits(
    app: Flask, auth: dict[str, str], bank: str, runtime: Runtime
) -> None:
    client = app.test_client()
    new_pdq = pdq_of(jpeg("astronaut"))
    before = client.get(f"/hma/m/lookup?signal_type=pdq&signal={new_pdq}", headers=auth)
    assert before.get_json() == {}
    with runtime.sessions() as session:
        events_before = session.scalars(select(AuditEvent.seq)).all()
    added = client.post(
        f"/hma/c/bank/{bank}/signal",
        json={"pdq": new_pdq.upper(), "note": "from HMA"},
        headers=auth,
    )
    assert added.status_code == 200, added.get_data(as_text=True)
    body = added.get_json()
    assert body["signals"] == {"pdq": new_pdq} and isinstance(body["id"], int)
    after = client.get(f"/hma/m/lookup?signal_type=pdq&signal={new_pdq}", headers=auth)
    assert after.get_json() == {bank: [{"bank_content_id": body["id"], "distance": "0"}]}
    with runtime.sessions() as session:
        new_events = session.scalars(
            select(AuditEvent).where(AuditEvent.seq.not_in(events_before))
        ).all()
    assert [(e.action, e.actor.startswith("client:")) for e in new_events] == [
        ("bank.import_hashes", True)
    ]
    again = client.post(f"/hma/c/bank/{bank}/signal", json={"pdq": new_pdq}, headers=auth)
    assert again.get_json()["id"] == body["id"]


def test_add_exact_signal_is_found_by_raw_lookup(
    app: Flask, auth: dict[str, str], bank: str
) -> None:
    client = app.test_client()
    md5 = "0123456789abcdef0123456789abcdef"
    added = client.post(f"/hma/c/bank/{bank}/signal", json={"video_md5": md5}, headers=auth)
    assert added.status_code == 200 and added.get_json()["signals"] == {"md5": md5}
    found = client.get(f"/hma/m/raw_lookup?signal_type=md5&signal={md5}", headers=auth)
    assert found.get_json() == {"matches": [added.get_json()["id"]]}


def test_banks(app: Flask, auth: dict[str, str], bank: str) -> None:
    client = app.test_client()
    listed = client.get("/hma/c/banks", headers=auth)
    assert listed.get_json() == [{"name": bank, "matching_enabled_ratio": 1.0}]
    one = client.get(f"/hma/c/bank/{bank}", headers=auth)
    assert one.get_json() == {"name": bank, "matching_enabled_ratio": 1.0}


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("get", "/hma/c/bank/nope", {}),
        ("post", "/hma/c/bank/nope/signal", {"json": {"pdq": "0" * 64}}),
        ("get", "/hma/m/nothing_here", {}),
    ],
)
def test_unknown_bank_is_404(
    app: Flask, auth: dict[str, str], bank: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = getattr(app.test_client(), method)(path, headers=auth, **kwargs)
    assert response.status_code == 404
    assert set(response.get_json()) == {"message"}


@pytest.mark.parametrize(
    "query",
    [
        "signal_type=pdq&signal=xyz",
        "signal_type=pdq&signal=" + "0" * 63,
        "signal_type=tmk&signal=" + "0" * 64,
        "signal_type=pdq",
    ],
)
def test_malformed_signal_is_400(app: Flask, auth: dict[str, str], bank: str, query: str) -> None:
    client = app.test_client()
    for path in ("/hma/m/raw_lookup", "/hma/m/lookup"):
        response = client.get(f"{path}?{query}", headers=auth)
        assert response.status_code == 400, (path, query)
        assert set(response.get_json()) == {"message"}
    bad_body = client.post(f"/hma/c/bank/{bank}/signal", json={"pdq": "xyz"}, headers=auth)
    assert bad_body.status_code == 400


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/hma/m/raw_lookup?signal_type=pdq&signal=" + "0" * 64),
        ("get", "/hma/m/lookup?signal_type=pdq&signal=" + "0" * 64),
        ("post", "/hma/m/lookup"),
        ("post", "/hma/h/hash"),
        ("get", "/hma/c/banks"),
        ("get", "/hma/c/bank/x"),
        ("post", "/hma/c/bank/x/signal"),
    ],
)
def test_token_required(app: Flask, method: str, path: str) -> None:
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer mod_wrong"}):
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401
        assert set(response.get_json()) == {"message"}
        assert "WWW-Authenticate" in response.headers


def test_unreadable_snapshot_is_503(
    app: Flask, auth: dict[str, str], bank: str, runtime: Runtime
) -> None:
    for path in runtime.settings.snapshots_dir.glob("*.snapshot"):
        path.write_bytes(b"garbage")
    response = app.test_client().get(
        "/hma/m/lookup?signal_type=pdq&signal=" + "0" * 64, headers=auth
    )
    assert response.status_code == 503
    assert response.get_json() == {"message": "index not yet ready"}


def test_every_hma_route_is_in_the_openapi_document(app: Flask) -> None:
    doc = app.test_client().get("/api/v1/openapi.json").get_json()
    routes = {
        (rule.rule.replace("<bank_name>", "{bank_name}"), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/hma/") and rule.endpoint != "hma.not_found"
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes and routes <= documented
    assert doc["components"]["schemas"]["HmaError"]["required"] == ["message"]


def test_vpdq_signal_added_then_looked_up_as_hma_does(
    app: Flask, auth: dict[str, str], runtime: Runtime, threatexchange_vpdq: Any
) -> None:
    import importlib

    from moderation.matching.video import decode_video_upload
    from moderation.media.video import VideoLimits
    from moderation.signals.vpdq import to_signal_str
    from tests.video_clips import clip, photo, recoloured

    def signal_of(data: bytes) -> str:
        return to_signal_str(decode_video_upload(data, VideoLimits()).vpdq)

    with transaction(runtime.sessions) as session:
        create_bank(session, "videos")
    client = app.test_client()
    listed = clip([(photo("astronaut"), 2.0), (photo("coffee"), 2.0)], "mp4")
    added = client.post(
        "/hma/c/bank/videos/signal", json={"vpdq": signal_of(listed), "note": "clip"}, headers=auth
    )
    assert added.status_code == 200, added.get_data(as_text=True)
    eid = added.get_json()["id"]
    copy = clip([(recoloured(photo("astronaut")), 2.0), (recoloured(photo("coffee")), 2.0)], "webm")
    # HMA's distance is python-threatexchange's VPDQSimilarityInfo.pretty_str.
    info = importlib.import_module("threatexchange.extensions.vpdq.vpdq_index")
    distance = info.VPDQSimilarityInfo(100.0, 100.0).pretty_str()
    query = {"signal_type": "vpdq", "signal": signal_of(copy)}
    found = client.get("/hma/m/lookup", query_string=query, headers=auth)
    assert found.get_json() == {"videos": [{"bank_content_id": eid, "distance": distance}]}
    raw = client.get(
        "/hma/m/raw_lookup", query_string={**query, "include_distance": "true"}, headers=auth
    )
    assert raw.get_json() == {"matches": [{"bank_content_id": eid, "distance": distance}]}
    # Half the frames match: under VPDQIndex's 80 %, no match.
    half = clip([(photo("astronaut"), 2.0), (photo("rocket"), 2.0)], "mov")
    query["signal"] = signal_of(half)
    assert client.get("/hma/m/lookup", query_string=query, headers=auth).get_json() == {}
    uploaded = client.post(
        "/hma/m/lookup",
        data={"video": (io.BytesIO(copy), "copy.webm")},
        headers=auth,
        content_type="multipart/form-data",
    )
    body = uploaded.get_json()
    assert body["vpdq"] == {"videos": [{"bank_content_id": eid, "distance": distance}]}
    assert body["md5"] == {}
    query["signal"] = '["not a feature"]'
    bad = client.get("/hma/m/lookup", query_string=query, headers=auth)
    assert bad.status_code == 400 and "vPDQ" in bad.get_json()["message"]
