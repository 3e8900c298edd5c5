"""A bank's owner and sharing on its console page (tenant isolation,
:mod:`moderation.banks.tenancy`): admins share it with one API client or all, stop sharing,
or change its owner; each change is audited like the CLI's ``bank share | unshare |
set-owner``."""

from __future__ import annotations

from flask import abort, flash, redirect, url_for
from werkzeug.wrappers import Response
from wtforms import HiddenField, StringField
from wtforms.validators import AnyOf, DataRequired, Length, Optional

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import permission_required, require_user, step_up_required
from moderation.banks.records import BlocklistError
from moderation.banks.tenancy import set_owner, set_shared
from moderation.storage.db import transaction
from moderation.storage.models import Bank

ACTIONS = ("share", "unshare", "owner")


class SharingForm(ConsoleForm):
    action = HiddenField(validators=[DataRequired(), AnyOf(list(ACTIONS))])
    # An API client's name; empty: every client (share, unshare) or the deployment (owner).
    client = StringField("API client", validators=[Optional(), Length(max=200)])


@permission_required("banks.write")
@step_up_required
def sharing(bank_id: int) -> Response:
    """``POST /banks/<id>/sharing``: share, unshare or re-own the bank (form ``action``,
    ``client``); registered on the banks blueprint by :mod:`admin.banks`."""
    user = require_user()
    with runtime().sessions() as db:
        bank = db.get(Bank, bank_id)
    if bank is None:
        abort(404)
    form = SharingForm()
    if not form.validate_on_submit():
        abort(400)
    client = form.client.data or None
    try:
        with transaction(runtime().sessions) as db:
            if form.action.data == "owner":
                set_owner(db, bank.name, client, actor=user.actor)
            else:
                shared = form.action.data == "share"
                set_shared(db, bank.name, client, shared=shared, actor=user.actor)
    except BlocklistError as exc:
        flash(str(exc), "error")
    else:
        flash("Sharing updated.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))
