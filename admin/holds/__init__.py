"""Legal holds for admins and the DPO: list them, place a manual hold (with a reason), release
a manual hold early (with a reason); each audited (:mod:`moderation.governance.legal_holds`).
Holds placed by a block or a reviewer's confirm are listed too; they end on expiry (beat)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from werkzeug.wrappers import Response
from wtforms import IntegerField, StringField
from wtforms.validators import DataRequired, Length, NumberRange

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import origin, permission_required, require_user, step_up_required
from moderation.governance.legal_holds import (
    MAX_MANUAL_DAYS,
    HoldError,
    list_holds,
    place_manual_hold,
    release_hold,
)
from moderation.storage.db import transaction

bp = Blueprint("holds", __name__, url_prefix="/holds")


class PlaceHoldForm(ConsoleForm):
    upload_id = StringField("Upload id", validators=[DataRequired(), Length(max=32)])
    days = IntegerField("Days", validators=[DataRequired(), NumberRange(1, MAX_MANUAL_DAYS)])
    reason = StringField("Reason", validators=[DataRequired(), Length(max=1000)])


class ReleaseHoldForm(ConsoleForm):
    reason = StringField("Reason", validators=[DataRequired(), Length(max=1000)])


def _page(form: PlaceHoldForm, status: int = 200) -> Any:
    with runtime().sessions() as db:
        holds = list_holds(db, include_released=True)
    return (
        render_template("holds/index.html", holds=holds, form=form, release_form=ReleaseHoldForm()),
        status,
    )


@bp.route("", methods=["GET"])
@permission_required("holds")
def index() -> Any:
    return _page(PlaceHoldForm())


@bp.route("", methods=["POST"])
@permission_required("holds")
@step_up_required
def place() -> Any:
    user = require_user()
    form = PlaceHoldForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    try:
        with transaction(runtime().sessions) as db:
            place_manual_hold(
                db,
                (form.upload_id.data or "").strip(),
                days=int(form.days.data or 0),
                reason=form.reason.data or "",
                actor=user.actor,
                origin=origin(),
            )
    except (HoldError, ValueError) as exc:
        flash(str(exc), "error")
        return _page(form, 400)
    flash("Legal hold placed.", "info")
    return redirect(url_for("holds.index"))


@bp.route("/<int:hold_id>/release", methods=["POST"])
@permission_required("holds")
@step_up_required
def release(hold_id: int) -> Response:
    user = require_user()
    form = ReleaseHoldForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        with transaction(runtime().sessions) as db:
            release_hold(
                db, hold_id, reason=form.reason.data or "", actor=user.actor, origin=origin()
            )
    except HoldError as exc:
        flash(str(exc), "error")
    else:
        flash(f"Hold {hold_id} released.", "info")
    return redirect(url_for("holds.index"))
