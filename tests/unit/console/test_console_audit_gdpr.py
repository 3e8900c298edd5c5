"""Audit and GDPR pages over the library's audit/GDPR API.

(``moderation.audit.verify.verify_chain``, ``moderation.audit.export.export_events``;
``moderation.governance.gdpr.preview_erasure``, ``erase_subject``).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from moderation.service.runtime import Runtime
from moderation.storage.models import AuditEvent, Upload


def test_audit_log_lists_filters_and_escapes(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    from moderation.audit.log import record_event
    from moderation.storage.db import transaction

    with transaction(console_runtime.sessions) as db:
        record_event(db, actor="test", action="test.thing", target="<script>x</script>")
    client.login(make_user("auditor"))
    page = client.get("/audit").get_data(as_text=True)
    assert "user.create" in page and "auth.login" in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    filtered = client.get("/audit?action=test.").get_data(as_text=True)
    assert "test.thing" in filtered and "auth.login" not in filtered


def test_audit_chain_verifies_and_exports(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    client.login(make_user("auditor"))
    verified = client.get("/audit/verify").get_data(as_text=True)
    assert 'data-ok="1"' in verified
    response = client.form("/audit/export", {"fmt": "jsonl"}, token_from="/audit")
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.data)) as bundle:
        events = [json.loads(line) for line in bundle.read("events.jsonl").splitlines()]
        manifest = json.loads(bundle.read("manifest.json"))
    with console_runtime.sessions() as db:
        seqs = list(db.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)))
    assert [e["seq"] for e in events] == seqs[: len(events)]
    assert manifest["count"] == len(events) and manifest["signature"]
    # The export itself is audited.
    with console_runtime.sessions() as db:
        assert db.scalars(select(AuditEvent).where(AuditEvent.action == "audit.export")).first()


def _subject_upload(rt: Runtime, subject_id: str) -> str:
    from moderation.service.subjects import pseudonymize
    from moderation.service.uploads import create_upload
    from moderation.storage.db import transaction

    with transaction(rt.sessions) as db:
        ref = pseudonymize(db, rt.keyring, subject_id)
        upload = create_upload(
            db, b"bytes", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir, subject_ref=ref
        )
        return upload.id


def test_dpo_previews_then_erases_a_subject(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    subject = "subject-4711"
    upload_id = _subject_upload(console_runtime, subject)
    client.login(make_user("dpo"))
    preview = client.form("/gdpr/preview", {"subject_id": subject}, token_from="/gdpr")
    assert preview.status_code == 200
    html = preview.get_data(as_text=True)
    assert "uploads" in html
    no_confirm = client.form("/gdpr/erase", {"subject_id": subject}, token_from="/gdpr")
    assert no_confirm.status_code == 400
    with console_runtime.sessions() as db:
        assert db.get(Upload, upload_id) is not None
    erased = client.form("/gdpr/erase", {"subject_id": subject, "confirm": "y"}, token_from="/gdpr")
    assert erased.status_code == 200
    receipt = erased.get_data(as_text=True)
    assert "signature" in receipt
    with console_runtime.sessions() as db:
        assert db.get(Upload, upload_id) is None
        events = db.scalars(select(AuditEvent.details)).all()
    assert all(subject not in json.dumps(d) for d in events)  # the raw id is never recorded


def test_erasure_request_is_recorded_and_erasing_needs_a_fresh_sign_in(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    import time

    from sqlalchemy import update

    from moderation.storage.console import ConsoleSession
    from moderation.storage.db import transaction
    from moderation.storage.models import ErasureRequest

    subject = "subject-0815"
    upload_id = _subject_upload(console_runtime, subject)
    dpo = make_user("dpo")
    client.login(dpo)
    recorded = client.form("/gdpr/register", {"subject_id": subject}, token_from="/gdpr")
    assert recorded.status_code == 302
    with console_runtime.sessions() as db:
        request = db.scalars(select(ErasureRequest)).one()
        assert request.state == "pending" and request.requested_by == f"user:{dpo.id}"
    assert request.id in client.get("/gdpr").get_data(as_text=True)

    with transaction(console_runtime.sessions) as db:
        row = db.scalars(select(ConsoleSession)).one()
        db.execute(
            update(ConsoleSession)
            .where(ConsoleSession.id == row.id)
            .values(data={**row.data, "auth_at": time.time() - 3600})
        )
    client.environ_base["HTTP_REFERER"] = "https://localhost/gdpr/preview"
    stale = client.form("/gdpr/erase", {"subject_id": subject, "confirm": "y"}, token_from="/gdpr")
    # The preview page was a POST: the user is sent back to the GDPR page, not to a 405.
    assert stale.headers["Location"] == "/reauth?next=/gdpr"
    with console_runtime.sessions() as db:
        assert db.get(Upload, upload_id) is not None
    client.environ_base["HTTP_REFERER"] = "https://localhost/"
    client.form(
        "/reauth", {"password": dpo.password, "code": client.totp_code(dpo)}, token_from="/reauth"
    )
    done = client.form("/gdpr/erase", {"subject_id": subject, "confirm": "y"}, token_from="/gdpr")
    assert done.status_code == 200
    with console_runtime.sessions() as db:
        assert db.get(Upload, upload_id) is None
        assert db.get(ErasureRequest, request.id).state == "done"  # type: ignore[union-attr]
