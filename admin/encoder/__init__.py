"""Encoder upgrades (admins act, auditors read): the status of the newest encoder migration,
starting one, promoting its target and rolling back. Each action calls one
:mod:`moderation.modelops` function (the ``moderation encoder`` CLI calls the same), audited
with the console user as actor; the migration itself runs in the workers' background job.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, url_for
from wtforms import HiddenField, StringField
from wtforms.validators import AnyOf, DataRequired, Length

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import origin, permission_required, require_user, step_up_required
from moderation.modelops.encoder_migration import MigrationError, start_migration
from moderation.modelops.encoder_promotion import PromotionRefused, promote, rollback
from moderation.modelops.encoder_status import encoder_status

bp = Blueprint("encoder", __name__, url_prefix="/encoder")


class MigrateForm(ConsoleForm):
    target = StringField("Target encoder", validators=[DataRequired(), Length(max=500)])


class SwitchForm(ConsoleForm):
    confirm = HiddenField(validators=[DataRequired(), AnyOf(["1"])])


def _page(*, form: MigrateForm | None = None, status: int = 200) -> Any:
    html = render_template(
        "encoder/index.html",
        status=encoder_status(runtime()),
        form=form or MigrateForm(),
        switch_form=SwitchForm(),
    )
    return html, status


@bp.route("", methods=["GET"])
@permission_required("banks.read")
def index() -> Any:
    return _page()


@bp.route("/migrate", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def migrate() -> Any:
    form = MigrateForm()
    if not form.validate_on_submit():
        return _page(form=form, status=400)
    try:
        start_migration(
            runtime(), (form.target.data or "").strip(), actor=require_user().actor, origin=origin()
        )
    except (MigrationError, ValueError, FileNotFoundError) as exc:
        flash(str(exc), "error")
        return _page(form=form, status=400)
    flash("Migration started: the workers build the target's snapshots in the background.", "info")
    return redirect(url_for("encoder.index"))


@bp.route("/promote", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def promote_target() -> Any:
    if not SwitchForm().validate_on_submit():
        return _page(status=400)
    try:
        switch = promote(runtime(), actor=require_user().actor, origin=origin())
    except PromotionRefused as exc:
        flash(f"Promotion refused: {exc}", "error")
        return _page(status=409)
    except MigrationError as exc:
        flash(str(exc), "error")
        return _page(status=400)
    flash(f"Promoted: {switch.serving} serves within the workers' reload interval.", "info")
    return redirect(url_for("encoder.index"))


@bp.route("/rollback", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def rollback_target() -> Any:
    if not SwitchForm().validate_on_submit():
        return _page(status=400)
    try:
        switch = rollback(runtime(), actor=require_user().actor, origin=origin())
    except MigrationError as exc:
        flash(str(exc), "error")
        return _page(status=400)
    flash(f"Rolled back: {switch.serving} serves again.", "info")
    return redirect(url_for("encoder.index"))
