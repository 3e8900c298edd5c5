"""The approve/reject form of two-person-rule requests (:mod:`moderation.governance.approvals`),
shared by the banks' removal approvals and the review console's allow proposals."""

from __future__ import annotations

from collections.abc import Callable

from flask import abort, flash, redirect, url_for
from werkzeug.wrappers import Response
from wtforms import HiddenField
from wtforms.validators import AnyOf, DataRequired

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import origin, require_user
from moderation.governance.approvals import ApprovalError, reject
from moderation.storage.db import transaction


class VerdictForm(ConsoleForm):
    verdict = HiddenField(validators=[DataRequired(), AnyOf(["approve", "reject"])])


def settle_verdict(approval_id: int, approve: Callable[[int], str], back: str) -> Response:
    """Apply the posted verdict on request ``approval_id`` as the signed-in user, then redirect
    to endpoint ``back``.

    ``approve(user_id)`` carries out an approval and returns the message to flash; a reject
    is :func:`moderation.governance.approvals.reject`. A refusal (:class:`ApprovalError`) is
    flashed as an error; a form without a valid verdict or CSRF token is a 400.
    """
    user = require_user()
    form = VerdictForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        if form.verdict.data == "approve":
            flash(approve(user.id), "info")
        else:
            with transaction(runtime().sessions) as db:
                reject(db, approval_id, approver_id=user.id, origin=origin())
            flash("Request rejected.", "info")
    except ApprovalError as exc:
        flash(str(exc), "error")
    return redirect(url_for(back))
