"""The web tier stays lean: a real ``moderation serve`` (gunicorn master and two workers) that
has answered the API, the console, the HMA API, ``/status`` and ``/metrics`` maps neither torch,
FAISS nor ONNX Runtime (``/proc/<pid>/maps`` of every process), README "Process footprint".

The import-linter contract ``lean-web-tier`` checks the imports statically; this checks what
the processes really loaded after serving, lazy imports included. Their memory is printed
(``pytest -s``) for the record, not asserted.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import requests
from PIL import Image

from moderation.benchmark.process_rss import descendants, mapped_files, pss_bytes, rss_bytes
from moderation.governance.users import create_user
from moderation.media.decode import decode_image
from moderation.signals.pdq import pdq_hash
from moderation.storage.db import transaction
from tests.conftest import skimage_photo
from tests.integration.queue_stack import METRICS_TOKEN, RedisServer, Stack, bank_images, wait_until

#: Shared objects of the heavy libraries: torch (libtorch*, torch/_C), FAISS (_swigfaiss*,
#: libfaiss*), ONNX Runtime (onnxruntime_pybind11_state*, libonnxruntime*).
HEAVY = re.compile(r"/(torch|faiss|onnxruntime|torchvision)/|libtorch|libfaiss|libonnxruntime")
PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"|value="([^"]+)"[^>]*name="csrf_token"')


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def exercise_api(base: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    photo = jpeg(skimage_photo("rocket").resize((160, 120)))
    created = requests.post(
        f"{base}/api/v1/screenings",
        data={"external_id": "post-1", "subject_id": "user-1"},
        files={"image": ("a.jpg", photo, "image/jpeg")},
        headers=auth,
        timeout=60,
    )
    assert created.status_code == 202, created.text
    upload = created.json()["id"]
    got = requests.get(f"{base}/api/v1/screenings/{upload}", headers=auth, timeout=60)
    assert got.status_code == 202 and got.json()["status"] == "queued", got.text
    assert requests.get(f"{base}/api/v1/openapi.json", timeout=60).status_code == 200


def exercise_hma(base: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    banked = next(iter(bank_images().values()))
    digest = pdq_hash(decode_image(banked).frames[0]).hex
    banks = requests.get(f"{base}/hma/c/banks", headers=auth, timeout=60)
    assert banks.status_code == 200 and [b["name"] for b in banks.json()] == ["known-bad"]
    # The PDQ lookup over the snapshot (a NumPy scan in the web tier, no FAISS) finds the entry.
    raw = requests.get(
        f"{base}/hma/m/raw_lookup",
        params={"signal_type": "pdq", "signal": digest, "include_distance": "true"},
        headers=auth,
        timeout=60,
    )
    assert raw.status_code == 200, raw.text
    assert [m["distance"] for m in raw.json()["matches"]] == ["0"]
    looked = requests.post(
        f"{base}/hma/m/lookup",
        files={"photo": ("b.jpg", banked, "image/jpeg")},
        headers=auth,
        timeout=60,
    )
    assert looked.status_code == 200, looked.text
    # Image entries match by PDQ; exact hashes come from hash-list entries only.
    assert list(looked.json()["pdq"]) == ["known-bad"] and looked.json()["md5"] == {}
    hashed = requests.post(
        f"{base}/hma/h/hash", files={"photo": ("b.jpg", banked)}, headers=auth, timeout=60
    )
    assert hashed.status_code == 200 and hashed.json()["pdq"] == digest


def add_hash_signal(base: str, token: str) -> None:
    """A write that publishes a snapshot (the HMA API's add-signal): the web process takes the
    serving encoder's id (hashing its weights file), which imports no heavy library either."""
    digest = pdq_hash(skimage_photo("hubble_deep_field").convert("RGB")).hex
    added = requests.post(
        f"{base}/hma/c/bank/known-bad/signal",
        json={"pdq": digest, "note": "lean web tier"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    assert added.status_code == 200 and added.json()["signals"] == {"pdq": digest}, added.text


def exercise_console(base: str, email: str) -> None:
    browser = requests.Session()
    login = browser.get(f"{base}/login", timeout=60)
    assert login.status_code == 200
    match = CSRF_RE.search(login.text)
    assert match, "no CSRF token on the login page"
    signed_in = browser.post(
        f"{base}/login",
        data={"email": email, "password": PASSWORD, "csrf_token": match.group(1) or match.group(2)},
        headers={"Referer": f"{base}/login"},
        allow_redirects=False,
        timeout=60,
    )
    assert signed_in.status_code == 302, signed_in.text[:500]
    for page in ("/dashboard", "/banks", "/banks/1", "/audit", "/account"):
        response = browser.get(f"{base}{page}", timeout=60)
        assert response.status_code == 200, (page, response.status_code)


def exercise_status(base: str) -> None:
    bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert requests.get(f"{base}/status/live", timeout=60).status_code == 200
    assert requests.get(f"{base}/status", headers=bearer, timeout=60).status_code in (200, 503)
    metrics = requests.get(f"{base}/metrics", headers=bearer, timeout=60)
    assert metrics.status_code == 200 and "moderation_" in metrics.text


def test_the_web_tier_maps_no_torch_faiss_or_onnxruntime(
    make_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    stack = make_stack(
        database_url=None,
        broker_url=redis_server.url,
        environment="development",
        console_plain_http_localhost=True,
    )
    runtime = stack.init()
    token = stack.create_client([]).token
    email = "auditor@example.com"
    with transaction(runtime.sessions) as session:
        create_user(
            session, runtime.keyring, email=email, role="auditor", password=PASSWORD, actor="test"
        )
    web = stack.start_web()

    def live() -> bool:
        assert web.alive(), web.output()[-3000:]
        try:
            return requests.get(f"{stack.base_url}/status/live", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(live, 180, "moderation serve to answer")
    add_hash_signal(stack.base_url, token)
    # Several rounds, so that both gunicorn workers (one listening socket) serve some of each.
    for _ in range(4):
        exercise_api(stack.base_url, token)
        exercise_hma(stack.base_url, token)
        exercise_console(stack.base_url, email)
        exercise_status(stack.base_url)

    processes = [web.pid, *descendants(web.pid)]
    assert len(processes) >= 3, f"expected a gunicorn master and 2 workers, got {processes}"
    for pid in processes:
        rss, pss = rss_bytes(pid) / 2**20, pss_bytes(pid) / 2**20
        print(f"web pid {pid}: RSS {rss:.1f} MiB, PSS {pss:.1f} MiB")
    print(
        f"web tier: RSS {sum(map(rss_bytes, processes)) / 2**20:.1f} MiB, "
        f"PSS {sum(map(pss_bytes, processes)) / 2**20:.1f} MiB"
    )
    heavy = {pid: sorted(p for p in mapped_files(pid) if HEAVY.search(p)) for pid in processes}
    assert all(mapped_files(pid) for pid in processes), "could not read /proc/<pid>/maps"
    assert heavy == {pid: [] for pid in processes}
