"""API clients (admins only): list, create, revoke, rotate the token or the callback secret, set
the callback allowlist. Each action calls one :mod:`moderation.service.api_clients` function
(the ``moderation api-client`` CLI calls the same), audited with the console user as actor.

New credentials are rendered once, in the answer to the POST that made them (``no-store``),
never flashed or kept in the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response
from wtforms import HiddenField, StringField, TextAreaField
from wtforms.validators import AnyOf, DataRequired, Length

from admin import runtime
from admin.forms import ConsoleForm
from admin.permissions import origin, permission_required, require_user, step_up_required
from moderation.service.api_clients import (
    ClientError,
    UnknownClientError,
    create_api_client,
    find_client,
    list_api_clients,
    revoke_api_client,
    rotate_callback_secret,
    rotate_token,
    set_allowlist,
)
from moderation.service.callback_urls import callback_policy
from moderation.storage.db import transaction

bp = Blueprint("clients", __name__, url_prefix="/clients")


class CreateClientForm(ConsoleForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=200)])
    allowlist = TextAreaField("Callback URL prefixes, one per line")


class RotateForm(ConsoleForm):
    what = HiddenField(validators=[DataRequired(), AnyOf(["token", "callback_secret"])])


class RevokeForm(ConsoleForm):
    confirm_name = StringField("Type the client's name", validators=[DataRequired()])


class AllowlistForm(ConsoleForm):
    allowlist = TextAreaField("Callback URL prefixes, one per line")
    submitted = HiddenField(validators=[DataRequired(), AnyOf(["1"])])


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _page(*, form: CreateClientForm | None = None, revealed: Any = None, status: int = 200) -> Any:
    with runtime().sessions() as db:
        clients = list_api_clients(db)
    html = render_template(
        "clients/index.html",
        clients=clients,
        form=form or CreateClientForm(),
        revealed=revealed,
        rotate_form=RotateForm(),
        revoke_form=RevokeForm(),
        allowlist_form=AllowlistForm(),
    )
    response = Response(html, status=status, mimetype="text/html")
    if revealed is not None:
        response.headers["Cache-Control"] = "no-store, private"
    return response


def _act(work: Callable[[Session], Any]) -> Any:
    """Run ``work`` in one transaction; an unknown client is 404, a refused action 400 with
    the reason flashed on the page."""
    try:
        with transaction(runtime().sessions) as db:
            return work(db)
    except UnknownClientError:
        abort(404)
    except ClientError as exc:
        flash(str(exc), "error")
        return _page(status=400)


@bp.route("", methods=["GET"])
@permission_required("api_clients")
def index() -> Any:
    return _page()


@bp.route("", methods=["POST"])
@permission_required("api_clients")
@step_up_required
def create() -> Any:
    user = require_user()
    form = CreateClientForm()
    if not form.validate_on_submit():
        return _page(form=form, status=400)
    rt = runtime()
    try:
        with transaction(rt.sessions) as db:
            created = create_api_client(
                db,
                rt.keyring,
                (form.name.data or "").strip(),
                callback_allowlist=_lines(form.allowlist.data),
                actor=user.actor,
                origin=origin(),
                policy=callback_policy(rt.settings),
            )
    except ClientError as exc:
        flash(str(exc), "error")
        return _page(form=form, status=400)
    secrets = {"token": created.token, "callback_secret": created.callback_secret}
    return _page(revealed={"client": created.name, "secrets": secrets})


@bp.route("/<int:client_id>/rotate", methods=["POST"])
@permission_required("api_clients")
@step_up_required
def rotate(client_id: int) -> Any:
    user = require_user()
    form = RotateForm()
    if not form.validate_on_submit():
        abort(400)
    rt = runtime()

    def work(db: Session) -> dict[str, Any]:
        if form.what.data == "token":
            secrets = {"token": rotate_token(db, client_id, actor=user.actor, origin=origin())}
        else:
            secret = rotate_callback_secret(
                db, rt.keyring, client_id, actor=user.actor, origin=origin()
            )
            secrets = {"callback_secret": secret}
        return {"client": find_client(db, client_id).name, "secrets": secrets}

    result = _act(work)
    return _page(revealed=result) if isinstance(result, dict) else result


@bp.route("/<int:client_id>/revoke", methods=["POST"])
@permission_required("api_clients")
@step_up_required
def revoke(client_id: int) -> Any:
    user = require_user()
    form = RevokeForm()
    if not form.validate_on_submit():
        abort(400)

    def work(db: Session) -> Response:
        if find_client(db, client_id).name != (form.confirm_name.data or "").strip():
            flash("The name typed does not match the client's name.", "error")
            return redirect(url_for("clients.index"))
        info = revoke_api_client(db, client_id, actor=user.actor, origin=origin())
        flash(f"Client {info.name} revoked: its token is refused from now on.", "info")
        return redirect(url_for("clients.index"))

    return _act(work)


@bp.route("/<int:client_id>/allowlist", methods=["POST"])
@permission_required("api_clients")
@step_up_required
def allowlist(client_id: int) -> Any:
    user = require_user()
    form = AllowlistForm()
    if not form.validate_on_submit():
        abort(400)

    policy = callback_policy(runtime().settings)

    def work(db: Session) -> Response:
        prefixes = _lines(form.allowlist.data)
        set_allowlist(db, client_id, prefixes, actor=user.actor, origin=origin(), policy=policy)
        flash("Callback allowlist saved.", "info")
        return redirect(url_for("clients.index"))

    return _act(work)
