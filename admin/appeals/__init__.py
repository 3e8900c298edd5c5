"""Appeals in the console: claim one, look at it (blurred preview), uphold or overturn it; and
the statements-of-reasons download for admins and auditors.

Views are thin over :mod:`moderation.governance.appeals` (claim, decide),
:mod:`moderation.governance.appeal_display` (what the pages show) and
:func:`moderation.matching.statements.export_decisions`.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    abort,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from werkzeug.wrappers import Response
from wtforms import DateTimeLocalField, SelectField, StringField, TextAreaField
from wtforms.validators import AnyOf, DataRequired, Length, Optional

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import origin, permission_required, require_user
from admin.review import MAX_REMEMBERED, upload_image_response
from moderation.governance.appeal_display import AppealPage, appeal_page
from moderation.governance.appeals import (
    OUTCOMES,
    AppealError,
    AppealNotFound,
    claim_appeal,
    decide_appeal,
    record_appeal_reveal,
)
from moderation.matching.statements import export_decisions
from moderation.storage.db import transaction

bp = Blueprint("appeals", __name__)

REVEALED_KEY = "revealed_appeals"
"""Session key: ids of the appeals whose image this reviewer revealed."""


class AppealClaimForm(ConsoleForm):
    """Take (or keep) an appeal."""


class AppealDecideForm(ConsoleForm):
    outcome = StringField(validators=[DataRequired(), AnyOf(list(OUTCOMES))])
    notes = TextAreaField("Notes", validators=[Optional(), Length(max=2000)])


class DecisionsExportForm(ConsoleForm):
    fmt = SelectField("Format", choices=["csv", "jsonl"], validators=[DataRequired()])
    since = DateTimeLocalField("From (UTC)", format="%Y-%m-%dT%H:%M", validators=[Optional()])


def _page(appeal_id: str) -> AppealPage:
    """The appeal's page for the signed-in reviewer; 404 when there is no such appeal."""
    with runtime().sessions() as db:
        page = appeal_page(db, appeal_id[:32], require_user().id)
    if page is None:
        abort(404)
    return page


@bp.route("/review/appeals/<appeal_id>")
@permission_required("review")
def appeal(appeal_id: str) -> str:
    page = _page(appeal_id)
    return render_template(
        "review/appeal.html",
        page=page,
        claim_form=AppealClaimForm(),
        decide_form=AppealDecideForm(),
        revealed=page.appeal.id in _revealed(),
    )


@bp.route("/review/appeals/<appeal_id>/image")
@permission_required("review")
def appeal_image(appeal_id: str) -> Response:
    """The blurred greyscale preview, for the reviewer holding the appeal only."""
    page = _page(appeal_id)
    if not page.mine:
        abort(404)
    full = request.args.get("variant") == "full"
    if full and page.appeal.id not in _revealed():
        abort(403)
    return upload_image_response(page.appeal.upload_id, preview=not full)


def _revealed() -> list[str]:
    value = session.get(REVEALED_KEY)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@bp.route("/review/appeals/<appeal_id>/reveal", methods=["POST"])
@permission_required("review")
def reveal(appeal_id: str) -> Response:
    """Show the held appeal's image un-blurred from now on (counted and audited)."""
    user = require_user()
    if not AppealClaimForm().validate_on_submit():
        abort(400)
    page = _page(appeal_id)
    try:
        with transaction(runtime().sessions) as db:
            record_appeal_reveal(db, page.appeal.id, user.id, origin=origin())
    except AppealError as exc:
        flash(str(exc), "error")
        return redirect(url_for("review.queue"))
    session[REVEALED_KEY] = [*_revealed(), page.appeal.id][-MAX_REMEMBERED:]
    return redirect(url_for("appeals.appeal", appeal_id=page.appeal.id))


@bp.route("/review/appeals/<appeal_id>/claim", methods=["POST"])
@permission_required("review")
def claim(appeal_id: str) -> Response:
    user = require_user()
    if not AppealClaimForm().validate_on_submit():
        abort(400)
    settings = runtime().settings
    try:
        with transaction(runtime().sessions) as db:
            claim_appeal(
                db,
                appeal_id[:32],
                reviewer_id=user.id,
                lease_seconds=settings.review_lease_seconds,
                daily_limit=settings.review_daily_exposure_limit,
            )
    except AppealNotFound:
        abort(404)
    except AppealError as exc:
        flash(str(exc), "error")
        return redirect(url_for("review.queue"))
    return redirect(url_for("appeals.appeal", appeal_id=appeal_id))


@bp.route("/review/appeals/<appeal_id>/decide", methods=["POST"])
@permission_required("review")
def decide(appeal_id: str) -> Response:
    user = require_user()
    form = AppealDecideForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        outcome = decide_appeal(
            runtime(),
            appeal_id[:32],
            reviewer_id=user.id,
            outcome=form.outcome.data or "",
            notes=form.notes.data or None,
            origin=origin(),
        )
    except AppealNotFound:
        abort(404)
    except AppealError as exc:
        flash(str(exc), "error")
        return redirect(url_for("review.queue"))
    flash(f"Appeal {outcome.outcome}: the upload is now {outcome.decision}.", "info")
    return redirect(url_for("review.queue"))


@bp.route("/decisions/export", methods=["POST"])
@permission_required("audit")
def export() -> Any:
    """Download every decision's statement of reasons (CSV or JSON Lines); audited."""
    user = require_user()
    form = DecisionsExportForm()
    if not form.validate_on_submit():
        abort(400)
    fmt = "csv" if form.fmt.data == "csv" else "jsonl"
    since = form.since.data.replace(tzinfo=UTC) if form.since.data else None
    text = io.StringIO()
    with transaction(runtime().sessions) as db:
        export_decisions(db, text, fmt=fmt, since=since, actor=user.actor, origin=origin())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return send_file(
        io.BytesIO(text.getvalue().encode("utf-8")),
        mimetype="text/csv" if fmt == "csv" else "application/x-ndjson",
        as_attachment=True,
        download_name=f"decisions-{stamp}.{fmt}",
    )
