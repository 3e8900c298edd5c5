"""GDPR erasure (Art. 17) for the DPO: record a request, preview what erasure touches, erase.

Raw subject ids are typed into POST forms only (never URLs, logs or audit events); the library
(:mod:`moderation.governance.gdpr`) pseudonymises them and signs the receipt.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from wtforms import BooleanField, PasswordField
from wtforms.validators import DataRequired, Length

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import permission_required, require_user, step_up_required
from moderation.governance.erasure_requests import list_requests, register_request
from moderation.governance.erasure_stores import GdprError
from moderation.governance.gdpr import erase_subject, preview_erasure

bp = Blueprint("gdpr", __name__, url_prefix="/gdpr")


class SubjectForm(ConsoleForm):
    # A password-type field keeps the id out of browser autofill history and screen captures.
    subject_id = PasswordField("Data subject id", validators=[DataRequired(), Length(max=500)])


class EraseForm(SubjectForm):
    confirm = BooleanField(
        "I have checked the preview and want to erase", validators=[DataRequired()]
    )


@bp.route("")
@permission_required("gdpr")
def index() -> str:
    with runtime().sessions() as db:
        requests = list_requests(db)
    return render_template("gdpr/index.html", form=SubjectForm(), requests=requests)


@bp.route("/register", methods=["POST"])
@permission_required("gdpr")
def register() -> Any:
    user = require_user()
    form = SubjectForm()
    if not form.validate_on_submit():
        abort(400)
    request_id = register_request(runtime(), form.subject_id.data or "", actor=user.actor)
    flash(f"Request {request_id} recorded: the one-month deadline runs from now.", "info")
    return redirect(url_for("gdpr.index"))


@bp.route("/preview", methods=["POST"])
@permission_required("gdpr")
def preview() -> Any:
    form = SubjectForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        counts = preview_erasure(runtime(), form.subject_id.data or "")
    except GdprError as exc:
        abort(503, str(exc))
    erase_form = EraseForm()
    erase_form.subject_id.data = form.subject_id.data
    return render_template("gdpr/preview.html", counts=counts, form=erase_form)


@bp.route("/erase", methods=["POST"])
@permission_required("gdpr")
@step_up_required
def erase() -> Any:
    user = require_user()
    form = EraseForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        receipt = erase_subject(runtime(), form.subject_id.data or "", actor=user.actor)
    except GdprError as exc:
        # Erasure resumes where it stopped: the DPO repeats it once the store is back.
        abort(503, f"{exc} (repeat the erasure to finish it)")
    return render_template("gdpr/receipt.html", receipt=receipt)
