"""Audit and GDPR pages over the library's audit/GDPR API (``moderation.audit.verify_chain``,
``export_events``; ``moderation.gdpr.preview_erasure``, ``erase_subject``)."""

from __future__ import annotations

import importlib.util
import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

import moderation.audit
from moderation.runtime import Runtime
from moderation.storage.models import AuditEvent, Upload

needs_audit_api = pytest.mark.skipif(
    not hasattr(moderation.audit, "verify_chain"),
    reason="moderation.audit.verify_chain/export_events not on main yet",
)
needs_gdpr = pytest.mark.skipif(
    importlib.util.find_spec("moderation.gdpr") is None, reason="moderation.gdpr not on main yet"
)


def test_audit_log_lists_filters_and_escapes(
    client: Any, make_user: Callable[..., Any], console_runtime: Runtime
) -> None:
    from moderation.audit import record_event
    from moderation.storage.db import transaction

    with transaction(console_runtime.sessions) as db:
        record_event(db, actor="test", action="test.thing", target="<script>x</script>")
    client.login(make_user("auditor"))
    page = client.get("/audit").get_data(as_text=True)
    assert "user.create" in page and "auth.login" in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    filtered = client.get("/audit?action=test.").get_data(as_text=True)
    assert "test.thing" in filtered and "auth.login" not in filtered


@needs_audit_api
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
    from moderation.storage.db import transaction
    from moderation.subjects import pseudonymize
    from moderation.uploads import create_upload

    with transaction(rt.sessions) as db:
        ref = pseudonymize(db, rt.keyring, subject_id)
        upload = create_upload(
            db, b"bytes", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir, subject_ref=ref
        )
        return upload.id


@needs_gdpr
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
