"""The audit log: browse events, verify the hash chain, export a signed copy.

Verification and export call the library (``moderation.audit.verify.verify_chain`` and
``moderation.audit.export.export_events``); this page only reads and renders.
"""

from __future__ import annotations

import io
import json
import zipfile
from datetime import UTC, datetime
from typing import Any, Literal

from flask import Blueprint, abort, render_template, request, send_file
from sqlalchemy import select
from wtforms import DateTimeLocalField, SelectField
from wtforms.validators import DataRequired, Optional

from admin import runtime
from admin.forms import ConsoleForm
from admin.hardening import DB_BIGINT_MAX, query_int
from admin.permissions import origin, permission_required, require_user
from moderation.audit.export import export_events
from moderation.audit.log import signing_key
from moderation.audit.verify import verify_chain
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent

bp = Blueprint("audit", __name__, url_prefix="/audit")

EVENTS_PER_PAGE = 100


class ExportForm(ConsoleForm):
    fmt = SelectField("Format", choices=["jsonl", "csv"], validators=[DataRequired()])
    since = DateTimeLocalField("From (UTC)", format="%Y-%m-%dT%H:%M", validators=[Optional()])
    until = DateTimeLocalField("Until (UTC)", format="%Y-%m-%dT%H:%M", validators=[Optional()])


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@bp.route("")
@permission_required("audit")
def index() -> str:
    action = (request.args.get("action") or "").strip()[:100]
    actor = (request.args.get("actor") or "").strip()[:200]
    before = query_int("before", maximum=DB_BIGINT_MAX)
    query = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(EVENTS_PER_PAGE)
    if action:
        query = query.where(AuditEvent.action.startswith(action, autoescape=True))
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if before:
        query = query.where(AuditEvent.seq < before)
    with runtime().sessions() as db:
        events = db.scalars(query).all()
    return render_template(
        "audit/index.html",
        events=events,
        action=action,
        actor=actor,
        older=events[-1].seq if len(events) == EVENTS_PER_PAGE else None,
        form=ExportForm(),
    )


@bp.route("/verify")
@permission_required("audit")
def verify() -> str:
    rt = runtime()
    with rt.sessions() as db:
        # The key ring pins the audit public key to the deployment's own signing secret.
        result = verify_chain(db, keyring=rt.keyring)
    return render_template("audit/verify.html", result=result)


@bp.route("/export", methods=["POST"])
@permission_required("audit")
def export() -> Any:
    user = require_user()
    form = ExportForm()
    if not form.validate_on_submit():
        abort(400)
    fmt: Literal["jsonl", "csv"] = "csv" if form.fmt.data == "csv" else "jsonl"
    events = io.BytesIO()
    rt = runtime()
    with transaction(rt.sessions) as db:
        manifest = export_events(
            db,
            fmt=fmt,
            since=_aware(form.since.data),
            until=_aware(form.until.data),
            out=events,
            actor=user.actor,
            signing_key=signing_key(db, rt.keyring, create=True, actor=user.actor),
            origin=origin(),
        )
    # One download holding the events and their signed manifest, verifiable offline.
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"events.{fmt}", events.getvalue())
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    bundle.seek(0)
    return send_file(
        bundle,
        mimetype="application/zip",
        as_attachment=True,
        download_name=f"audit-export-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.zip",
    )
