"""The upload API under abuse, over real HTTP against `moderation serve` and a real `moderation
worker` (RELIABILITY.md "Upload API, callbacks and the web tier under abuse", rows S4-S7), and
README's promise that a POST without ``?wait=`` answers 202.

One deployment for the module (no-broker mode: SQLite and kombu's SQLAlchemy transport, so no
Redis): a web process and a worker with the development setting ``callback_allow_loopback`` (the
callback receiver listens on 127.0.0.1). The S5 test adds a production web process and swaps
in a production worker, to show loopback refused at submission and re-checked at delivery.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from moderation.storage.db import transaction
from moderation.storage.models import ApiClient, AuditEvent, CallbackDelivery, Upload
from tests.integration.queue_stack import (
    CallbackReceiver,
    Service,
    Stack,
    free_port,
    running_receiver,
    stack_factory,
    upload_images,
    wait_live,
    wait_until,
)

pytestmark = [pytest.mark.slow]

TIMEOUT = 180  # s: a screening on a loaded 2-core machine, with margin


@dataclass
class Deployment:
    stack: Stack
    client: Any
    receiver: CallbackReceiver
    worker: Service
    worker_allows_loopback: bool = True
    images: Iterator[bytes] = field(default_factory=lambda: iter(upload_images(40, seed=19)))

    @property
    def prefix(self) -> str:
        return self.receiver.prefix

    def use_worker(self, *, allow_loopback: bool) -> None:
        """Run the worker with (development) or without (production) loopback callbacks."""
        if allow_loopback == self.worker_allows_loopback and self.worker.alive():
            return
        self.worker.stop()
        self.worker = self.stack.start_worker(callback_allow_loopback=allow_loopback)
        self.worker_allows_loopback = allow_loopback

    def post(
        self,
        fields: dict[str, str] | list[tuple[str, str]],
        *,
        image: bytes | None = None,
        files: list[tuple[str, Any]] | None = None,
        key: str | None = None,
        wait: float | None = None,
        token: str | None = None,
        base_url: str | None = None,
    ) -> requests.Response:
        """POST /api/v1/screenings as multipart (``files`` replaces the one ``image`` part)."""
        parts = files if files is not None else [("image", ("i.jpg", image, "image/jpeg"))]
        headers = {"Authorization": f"Bearer {token or self.client.token}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return requests.post(
            f"{base_url or self.stack.base_url}/api/v1/screenings",
            data=fields,
            files=parts,
            headers=headers,
            params={"wait": str(wait)} if wait is not None else {},
            timeout=60 + (wait or 0),
        )

    def count_uploads(self, *where: Any) -> int:
        with self.stack.runtime.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Upload).where(*where)) or 0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with running_receiver() as receiver, stack_factory(tmp_path_factory.mktemp("abuse")) as make:
        stack = make(database_url=None, broker_url=None)
        stack.init()
        client = stack.create_client([receiver.prefix])
        stack.start_web()
        worker = stack.start_worker()
        stack.wait_ready()
        yield Deployment(stack, client, receiver, worker)


@pytest.fixture
def dev_worker(deployment: Deployment) -> Deployment:
    """The deployment with its worker in the development setting (delivers to loopback)."""
    deployment.use_worker(allow_loopback=True)
    return deployment


def _error_code(response: requests.Response) -> str:
    return str(response.json()["error"]["code"])


# --- S4 ---------------------------------------------------------------------------------------


def test_s4_callback_urls_escaping_their_prefix_are_refused_and_never_delivered(
    dev_worker: Deployment,
) -> None:
    dep, image = dev_worker, next(dev_worker.images)
    escaping = [
        "/../admin",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/.%2e/admin",
        "/./in",
        "/in/../../admin",
        "//admin",
        "/in//x",
        "\\..\\admin",
        "/..\\admin",
        "/..;/admin",
        "/%2f..%2fadmin",
        "/%5c..%5cadmin",
    ]
    for n, tail in enumerate(escaping):
        fields = {"external_id": f"s4-{n}", "subject_id": "s4", "callback_url": dep.prefix + tail}
        response = dep.post(fields, image=image)
        assert response.status_code == 422, (tail, response.status_code, response.text)
        assert _error_code(response) == "callback_not_allowed", tail
    assert dep.count_uploads(Upload.external_id.like("s4-%")) == 0

    # Control: a callback URL under the prefix is accepted and delivered; only it arrives.
    fields = {"external_id": "s4-ok", "subject_id": "s4", "callback_url": dep.prefix + "/s4"}
    accepted = dep.post(fields, image=image)
    assert accepted.status_code == 202, accepted.text
    wait_until(lambda: "/hooks/s4" in dep.receiver.paths, TIMEOUT, "the S4 control callback")
    assert all(p.startswith("/hooks/") and "admin" not in p for p in dep.receiver.paths), (
        dep.receiver.paths
    )


# --- S5 at submission --------------------------------------------------------------------------


def test_s5_non_public_callback_hosts_are_refused_even_when_allowlisted(
    deployment: Deployment,
) -> None:
    """Allowlist entries written before these rules (or straight into the database) still do
    not let a callback reach metadata, private, unspecified or mapped addresses, nor plain
    http to a public host in production; the development setting opens loopback only."""
    dep = deployment
    entries = [
        "https://169.254.169.254/latest",
        "https://10.0.0.1/hooks",
        "https://172.16.5.4/hooks",
        "https://192.168.1.1/hooks",
        "https://0.0.0.0/hooks",
        "https://[::]/hooks",
        "https://[fd00::1]/hooks",
        "https://[fe80::1]/hooks",
        "https://[::ffff:169.254.169.254]/latest",
        "https://[::ffff:10.0.0.1]/hooks",
        "https://2130706433/hooks",
        "https://127.1/hooks",
        "http://hooks.example.com/hooks",
    ]
    other = dep.stack.create_client([])
    with transaction(dep.stack.runtime.sessions) as session:
        row = session.get(ApiClient, other.client_id)
        assert row is not None
        row.callback_allowlist = entries
    image = next(dep.images)
    for n, entry in enumerate(entries):
        fields = {"external_id": f"s5-{n}", "subject_id": "s5", "callback_url": entry + "/x"}
        response = dep.post(fields, image=image, token=other.token)
        assert response.status_code == 422, (entry, response.status_code, response.text)
        assert _error_code(response) == "callback_not_allowed", entry
    assert dep.count_uploads(Upload.external_id.like("s5-%")) == 0


# --- S6 -------------------------------------------------------------------------------------------


def test_s6_an_idempotency_key_replayed_with_other_fields_is_refused(
    deployment: Deployment,
) -> None:
    dep = deployment
    image = next(dep.images)
    first_fields = {
        "external_id": "s6-a",
        "subject_id": "s6-subject",
        "callback_url": dep.prefix + "/s6",
    }
    first = dep.post(first_fields, image=image, key="s6-key")
    assert first.status_code == 202, first.text
    for name, value in (
        ("external_id", "s6-b"),
        ("subject_id", "s6-other-subject"),
        ("callback_url", dep.prefix + "/s6-other"),
    ):
        changed = dep.post({**first_fields, name: value}, image=image, key="s6-key")
        assert changed.status_code == 422, (name, changed.text)
        assert _error_code(changed) == "idempotency_key_reused"
        assert name in changed.json()["error"]["message"]
    dropped = {k: v for k, v in first_fields.items() if k != "callback_url"}
    assert dep.post(dropped, image=image, key="s6-key").status_code == 422
    # The same request again is a replay of the first upload.
    again = dep.post(first_fields, image=image, key="s6-key")
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    with dep.stack.runtime.sessions() as session:
        (upload,) = session.scalars(select(Upload).where(Upload.id == first.json()["id"])).all()
        assert upload.external_id == "s6-a" and upload.callback_url == dep.prefix + "/s6"
    assert dep.count_uploads(Upload.external_id.like("s6-%")) == 1


# --- S7 -------------------------------------------------------------------------------------------


def test_s7_multipart_with_two_images_or_extra_files_is_refused(deployment: Deployment) -> None:
    dep = deployment
    first, second = next(dep.images), next(dep.images)
    fields = {"external_id": "s7", "subject_id": "s7"}
    cases: list[tuple[Any, list[tuple[str, Any]]]] = [
        (
            fields,
            [("image", ("a.jpg", first, "image/jpeg")), ("image", ("b.jpg", second, "image/jpeg"))],
        ),
        (
            fields,
            [
                ("image", ("a.jpg", first, "image/jpeg")),
                ("thumbnail", ("t.jpg", second, "image/jpeg")),
            ],
        ),
        (fields, [("photo", ("a.jpg", first, "image/jpeg"))]),
        (
            [("external_id", "s7"), ("external_id", "s7-again"), ("subject_id", "s7")],
            [("image", ("a.jpg", first, "image/jpeg"))],
        ),
    ]
    for data, files in cases:
        response = dep.post(data, files=files)
        assert response.status_code == 400, (files, response.text)
        assert _error_code(response) == "bad_request"
    assert dep.count_uploads(Upload.external_id.like("s7%")) == 0
    control = dep.post(fields, files=[("image", ("a.jpg", first, "image/jpeg"))])
    assert control.status_code == 202, control.text


# --- README: POST answers 202 unless it waits ---------------------------------------------------


def test_post_without_wait_answers_202_even_when_the_result_is_ready(
    dev_worker: Deployment,
) -> None:
    dep, image = dev_worker, next(dev_worker.images)
    fields = {"external_id": "w-1", "subject_id": "w"}
    first = dep.post(fields, image=image, key="w-key")
    assert first.status_code == 202, first.text
    upload_id = first.json()["id"]
    headers = {"Authorization": f"Bearer {dep.client.token}"}

    def done() -> bool:
        got = requests.get(
            f"{dep.stack.base_url}/api/v1/screenings/{upload_id}?wait=5",
            headers=headers,
            timeout=60,
        )
        return got.status_code == 200 and got.json()["status"] == "done"

    wait_until(done, TIMEOUT, "the screening")
    replay = dep.post(fields, image=image, key="w-key")
    assert replay.status_code == 202, replay.text
    assert replay.json() == {"id": upload_id, "status": "done"}
    assert replay.headers["Location"] == f"/api/v1/screenings/{upload_id}"
    assert replay.headers["Idempotent-Replayed"] == "true"
    waited = dep.post(fields, image=image, key="w-key", wait=5)
    assert waited.status_code == 200 and waited.json()["result"]["decision"] in (
        "allow",
        "review",
        "block",
    )


# --- S5 in production, and at delivery time ------------------------------------------------------


def _start_production_web(stack: Stack) -> str:
    port = free_port()
    service = stack.start(
        "web-production",
        "serve",
        "--port",
        str(port),
        "--workers",
        "1",
        callback_allow_loopback=False,
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_live(service, base_url, TIMEOUT)
    return base_url


def test_s5_production_refuses_loopback_callbacks_at_submission_and_at_delivery(
    deployment: Deployment,
) -> None:
    dep = deployment
    image = next(dep.images)
    # A production web process (no development setting) refuses the loopback receiver, though
    # it is on the client's allowlist.
    production = _start_production_web(dep.stack)
    fields = {"external_id": "s5-prod", "subject_id": "s5", "callback_url": dep.prefix + "/prod"}
    refused = dep.post(fields, image=image, base_url=production)
    assert refused.status_code == 422, refused.text
    assert "public address" in refused.json()["error"]["message"]

    # Accepted by a development web process, then delivered by a production worker: the
    # delivery re-checks the URL under the worker's settings and sends nothing.
    dep.use_worker(allow_loopback=False)
    fields = {"external_id": "s5-late", "subject_id": "s5", "callback_url": dep.prefix + "/late"}
    accepted = dep.post(fields, image=image)
    assert accepted.status_code == 202, accepted.text
    upload_id = accepted.json()["id"]

    def finished() -> CallbackDelivery | None:
        try:
            with dep.stack.runtime.sessions() as session:
                return session.scalar(
                    select(CallbackDelivery).where(
                        CallbackDelivery.upload_id == upload_id,
                        CallbackDelivery.state != "pending",
                    )
                )
        except OperationalError:  # SQLite busy past its timeout while the new worker starts
            return None

    delivery = wait_until(finished, TIMEOUT, "the refused delivery")
    assert delivery.state == "failed"
    assert "/hooks/late" not in dep.receiver.paths and "/hooks/prod" not in dep.receiver.paths
    with dep.stack.runtime.sessions() as session:
        audit = session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "callback.deliver",
                AuditEvent.target == f"upload:{upload_id}",
            )
        )
    assert audit is not None and audit.outcome == "denied"
