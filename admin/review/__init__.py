"""The review queue: claim, look (blurred and greyscale until revealed), decide; keyboard-driven."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response
from wtforms import HiddenField, IntegerField, StringField, TextAreaField
from wtforms.validators import AnyOf, DataRequired, Length, NumberRange, Optional

from admin import runtime
from admin.forms import ConsoleForm
from admin.hardening import DB_INT_MAX, query_int
from admin.permissions import (
    Principal,
    origin,
    permission_required,
    require_user,
    step_up_required,
)
from admin.verdicts import VerdictForm, settle_verdict
from moderation.banks.records import BlocklistError
from moderation.governance.allow_proposals import (
    approve_allow,
    pending_allow_proposals,
    pending_proposal_upload,
)
from moderation.governance.appeal_display import open_appeals
from moderation.governance.review import (
    ExposureLimitReached,
    NotClaimedError,
    ReviewError,
    claim_next,
    record_reveal,
    release,
)
from moderation.governance.review_decisions import DECISIONS, decide
from moderation.governance.review_display import (
    ItemAccessDenied,
    ItemNotFound,
    ItemView,
    item_page,
    load_item,
    queue_page,
    render_upload,
)
from moderation.governance.tenancy import client_choices
from moderation.storage.db import transaction

bp = Blueprint("review", __name__, url_prefix="/review")

ACTIONS = ("reveal", "skip", *DECISIONS)
MAX_REMEMBERED = 200
"""Revealed and skipped item ids kept in the session."""


class ClaimForm(ConsoleForm):
    queue = HiddenField(validators=[DataRequired(), AnyOf(["main", "escalated"])])
    client = IntegerField(validators=[Optional(), NumberRange(1, DB_INT_MAX)])


class ActForm(ConsoleForm):
    action = StringField(validators=[DataRequired(), AnyOf(list(ACTIONS))])
    bank = StringField(validators=[Optional(), Length(max=200)])
    notes = TextAreaField("Notes", validators=[Optional(), Length(max=2000)])


def _remembered(key: str) -> list[int]:
    value = session.get(key)
    return [int(v) for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _remember(key: str, item_id: int) -> None:
    values = [v for v in _remembered(key) if v != item_id] + [item_id]
    session[key] = values[-MAX_REMEMBERED:]


@contextmanager
def _item_errors() -> Iterator[None]:
    """404 for an unknown item, 403 for one the user may neither work on nor read."""
    try:
        yield
    except ItemNotFound:
        abort(404)
    except ItemAccessDenied:
        abort(403)


def _load(item_id: int, user: Principal) -> tuple[ItemView, str]:
    with _item_errors():
        return load_item(runtime(), item_id, user.id, user.role)


def _claim_and_go(user: Principal, queue: str, client_id: int | None = None) -> Response:
    rt = runtime()
    settings = rt.settings
    try:
        with transaction(rt.sessions) as db:
            item = claim_next(
                db,
                reviewer_id=user.id,
                lease_seconds=settings.review_lease_seconds,
                daily_limit=settings.review_daily_exposure_limit,
                queue=queue,
                exclude=_remembered("skipped"),
                client_id=client_id,
            )
            item_id = item.id if item is not None else None
    except ExposureLimitReached:
        flash("You have reached today's limit of review items. Thank you: take a break.", "warning")
        return redirect(url_for("review.queue"))
    except ReviewError as exc:
        flash(str(exc), "error")
        return redirect(url_for("review.queue"))
    if item_id is None:
        flash("The queue is empty.", "info")
        return redirect(url_for("review.queue"))
    session["queue"] = queue
    return redirect(url_for("review.item", item_id=item_id))


@bp.route("")
@permission_required("review")
def queue() -> str:
    user = require_user()
    client_id = query_int("client")
    try:
        page = queue_page(
            runtime(), user.id, escalated=user.can("review.escalated"), client_id=client_id
        )
    except ReviewError:
        abort(404)
    with runtime().sessions() as db:
        clients = client_choices(db)
        appeals = open_appeals(db, user.id)
    return render_template(
        "review/queue.html",
        stats=page.stats,
        mine=page.mine,
        exposure=page.exposure,
        last=page.last,
        form=ClaimForm(),
        can_escalated=user.can("review.escalated"),
        clients=clients,
        client_id=client_id,
        appeals=appeals,
    )


@bp.route("/claim", methods=["POST"])
@permission_required("review")
def claim() -> Response:
    user = require_user()
    form = ClaimForm()
    if not form.validate_on_submit():
        abort(400)
    queue_name = form.queue.data or "main"
    if queue_name == "escalated" and not user.can("review.escalated"):
        abort(403)
    return _claim_and_go(user, queue_name, form.client.data)


@bp.route("/<int:item_id>")
@permission_required("review")
def item(item_id: int) -> str:
    user = require_user()
    with _item_errors():
        page = item_page(runtime(), item_id, user.id, user.role)
    return render_template(
        "review/item.html",
        view=page.view,
        exif=page.exif,
        access=page.access,
        revealed=item_id in _remembered("revealed"),
        exposure=page.exposure,
        banks=page.banks,
        previous=page.previous,
        claim_form=ClaimForm(queue=session.get("queue", "main")),
    )


@bp.route("/<int:item_id>/image")
@permission_required("review")
def image(item_id: int) -> Response:
    user = require_user()
    view, _access_kind = _load(item_id, user)
    full = request.args.get("variant") == "full"
    if full and item_id not in _remembered("revealed"):
        abort(403)
    return upload_image_response(view.upload_id, preview=not full)


def upload_image_response(upload_id: str, *, preview: bool) -> Response:
    """The upload re-encoded as JPEG (``render_upload``), never cached; 404 when it is gone."""
    rendered = render_upload(runtime(), upload_id, preview=preview)
    if rendered is None:
        abort(404)
    return _jpeg(rendered.jpeg)


def _jpeg(data: bytes) -> Response:
    """An upload's re-encoded JPEG, never cached."""
    response = Response(data, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "no-store, private"
    return response


@bp.route("/<int:item_id>/act", methods=["POST"])
@permission_required("review")
def act(item_id: int) -> Any:
    user = require_user()
    form = ActForm()
    if not form.validate_on_submit():
        abort(400)
    action = form.action.data or ""
    _view, access = _load(item_id, user)
    rt = runtime()
    queue_name = str(session.get("queue", "main"))
    if action == "reveal":
        with transaction(rt.sessions) as db:
            record_reveal(db, item_id, user.id, origin=origin())
        _remember("revealed", item_id)
        return redirect(url_for("review.item", item_id=item_id))
    if access != "work":
        flash("This item is not assigned to you.", "error")
        return redirect(url_for("review.queue"))
    if action == "skip":
        with transaction(rt.sessions) as db:
            release(db, item_id, user.id)
        _remember("skipped", item_id)
        return _claim_and_go(user, queue_name)
    try:
        outcome = decide(
            rt,
            item_id,
            reviewer_id=user.id,
            decision=action,
            bank_name=form.bank.data or None,
            notes=form.notes.data or None,
            origin=origin(),
        )
    except NotClaimedError:
        flash("Your claim on this item ran out and someone else took it.", "error")
        return redirect(url_for("review.queue"))
    except (ReviewError, BlocklistError) as exc:
        flash(str(exc), "error")
        return redirect(url_for("review.item", item_id=item_id))
    label = {"confirm": "Confirmed", "not_a_match": "Not a match", "escalate": "Escalated"}[action]
    note = f" and added to the bank as {outcome.entry_id}" if outcome.entry_id else ""
    if outcome.proposal_id is not None:
        note = f"; allow-bank addition proposed ({outcome.proposal_id}), a second person approves"
    flash(f"{label}: item {item_id}{note}.", "info")
    return _claim_and_go(user, queue_name)


# --- allow proposals (two-person rule for allow banks) -------------------------------------


@bp.route("/allow-proposals")
@permission_required("review")
def allow_proposals() -> str:
    with runtime().sessions() as db:
        pending = pending_allow_proposals(db)
    return render_template("review/allow_proposals.html", pending=pending, form=VerdictForm())


@bp.route("/allow-proposals/<int:approval_id>/image")
@permission_required("review")
def allow_proposal_image(approval_id: int) -> Response:
    rt = runtime()
    with rt.sessions() as db:
        upload_id = pending_proposal_upload(db, approval_id)
    rendered = render_upload(rt, upload_id, preview=True) if upload_id is not None else None
    if rendered is None:
        abort(404)
    return _jpeg(rendered.jpeg)


@bp.route("/allow-proposals/<int:approval_id>", methods=["POST"])
@permission_required("review")
@step_up_required
def decide_allow_proposal(approval_id: int) -> Response:
    def carry_out(user_id: int) -> str:
        done = approve_allow(runtime(), approval_id, approver_id=user_id, origin=origin())
        return f"Approved: the image is in allow bank {done.bank} ({done.entry_id})."

    return settle_verdict(approval_id, carry_out, "review.allow_proposals")
