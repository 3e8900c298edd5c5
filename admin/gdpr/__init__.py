"""GDPR erasure (Art. 17) for the DPO: preview what a data subject's erasure touches, then erase.

Raw subject ids are typed into POST forms only (never URLs, logs or audit events); the library
(``moderation.gdpr.preview_erasure`` and ``erase_subject``) pseudonymises them.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, render_template
from sqlalchemy import select
from wtforms import BooleanField, PasswordField
from wtforms.validators import DataRequired, Length

from admin import library, runtime
from admin.forms import ConsoleForm
from admin.permissions import permission_required, require_user, step_up_required
from moderation.storage.models import ErasureRequest

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
        requests = db.scalars(
            select(ErasureRequest).order_by(ErasureRequest.received_at.desc()).limit(100)
        ).all()
    return render_template("gdpr/index.html", form=SubjectForm(), requests=requests)


@bp.route("/preview", methods=["POST"])
@permission_required("gdpr")
def preview() -> Any:
    form = SubjectForm()
    if not form.validate_on_submit():
        abort(400)
    (preview_erasure,) = library("moderation.gdpr", "preview_erasure")

    counts = preview_erasure(runtime(), form.subject_id.data or "")
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
    (erase_subject,) = library("moderation.gdpr", "erase_subject")

    receipt = erase_subject(runtime(), form.subject_id.data or "", actor=user.actor)
    return render_template("gdpr/receipt.html", receipt=receipt)
