"""Banks: list, create, import a zip or a hash list in the background, entries, enable/disable,
removals, and quarantined (noisy) entries to confirm or release
(:mod:`moderation.banks.flood_control`).

Removing entries or a whole bank is a request that a second admin approves (two-person rule,
:mod:`moderation.governance.approvals`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, abort, current_app, flash, redirect, render_template, url_for
from flask_wtf.file import FileField, FileRequired
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response
from wtforms import HiddenField, SelectField, SelectMultipleField, StringField
from wtforms.validators import AnyOf, DataRequired, Length

from admin import runtime
from admin.banks.sharing import SharingForm, sharing
from admin.forms import ConsoleForm
from admin.hardening import bounded_int, bulk_upload, query_int
from admin.permissions import origin, permission_required, require_user, step_up_required
from admin.verdicts import VerdictForm, settle_verdict
from moderation.banks.flood_control import confirm_entry, list_quarantined, release_entry
from moderation.banks.hash_jobs import create_hash_import_job
from moderation.banks.hashlists import FORMATS
from moderation.banks.job_staging import JobError
from moderation.banks.jobs import JobRunner, create_import_job, job_view
from moderation.banks.operations import rename_bank, set_bank_enabled, set_entry_disabled
from moderation.banks.records import BlocklistError, create_bank_audited, entries_page
from moderation.banks.sealed_fields import entry_fields
from moderation.banks.tenancy import sharing_of
from moderation.governance.approvals import (
    DELETE_BANK,
    DELETE_ENTRIES,
    ApprovalError,
    approve,
    list_approvals,
    request_removal,
)
from moderation.storage.console import Job
from moderation.storage.db import transaction
from moderation.storage.models import Bank, Entry

bp = Blueprint("banks", __name__, url_prefix="/banks")
bp.add_url_rule("/<int:bank_id>/sharing", view_func=sharing, methods=["POST"])

ENTRIES_PER_PAGE = 500


class CreateBankForm(ConsoleForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=200)])
    kind = SelectField("Kind", choices=["block", "allow"])
    category = StringField("Category", default="default", validators=[Length(max=100)])


class ImportForm(ConsoleForm):
    archive = FileField("Zip of images", validators=[FileRequired()])


class HashListForm(ConsoleForm):
    hashes = FileField("Hash list", validators=[FileRequired()])
    format = SelectField("Format", choices=list(FORMATS), default="auto")


class BankStateForm(ConsoleForm):
    enabled = HiddenField(validators=[DataRequired(), AnyOf(["0", "1"])])


class EntryStateForm(ConsoleForm):
    disabled = HiddenField(validators=[DataRequired(), AnyOf(["0", "1"])])


class QuarantineForm(ConsoleForm):
    outcome = HiddenField(validators=[DataRequired(), AnyOf(["confirm", "release"])])


class RemoveEntriesForm(ConsoleForm):
    entry_ids = SelectMultipleField(
        coerce=bounded_int, validate_choice=False, validators=[DataRequired()]
    )


class RenameBankForm(ConsoleForm):
    new_name = StringField("New name", validators=[DataRequired(), Length(max=200)])


class DeleteBankForm(ConsoleForm):
    confirm_name = StringField("Type the bank's name", validators=[DataRequired()])


def _bank(bank_id: int) -> Bank:
    with runtime().sessions() as db:
        bank = db.get(Bank, bank_id)
    if bank is None:
        abort(404)
    return bank


def _banks_page(form: CreateBankForm, status: int = 200) -> Any:
    from moderation.banks.operations import list_banks

    return render_template("banks/list.html", banks=list_banks(runtime()), form=form), status


@bp.route("", methods=["GET"])
@permission_required("banks.read")
def index() -> Any:
    return _banks_page(CreateBankForm())


@bp.route("", methods=["POST"])
@permission_required("banks.write")
def create() -> Any:
    user = require_user()
    form = CreateBankForm()
    if not form.validate_on_submit():
        return _banks_page(form, 400)
    try:
        with transaction(runtime().sessions) as db:
            bank = create_bank_audited(
                db,
                form.name.data or "",
                kind=form.kind.data or "block",
                category=form.category.data or "default",
                actor=user.actor,
                origin=origin(),
            )
            bank_id = bank.id
    except BlocklistError as exc:
        flash(str(exc), "error")
        return _banks_page(form, 400)
    flash("Bank created.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))


@bp.route("/<int:bank_id>")
@permission_required("banks.read")
def show(bank_id: int) -> str:
    bank = _bank(bank_id)
    page = query_int("page", 1) or 1
    keyring = runtime().keyring
    with runtime().sessions() as db:
        entries, total = entries_page(db, bank_id, page=page, per_page=ENTRIES_PER_PAGE)
        shares = sharing_of(db, bank)
        fields = entry_fields(db, keyring, [e.id for e in entries])
        quarantined = list_quarantined(db, keyring, bank_id=bank_id)
    return render_template(
        "banks/show.html",
        bank=bank,
        entries=entries,
        fields=fields,
        total=total,
        page=page,
        pages=max(1, -(-total // ENTRIES_PER_PAGE)),
        import_form=ImportForm(),
        hash_form=HashListForm(),
        state_form=BankStateForm(),
        entry_form=EntryStateForm(),
        quarantined=quarantined,
        quarantine_form=QuarantineForm(),
        remove_form=RemoveEntriesForm(),
        delete_form=DeleteBankForm(),
        rename_form=RenameBankForm(),
        sharing=shares,
        sharing_form=SharingForm(),
    )


def _start_job(bank_id: int, upload: Any, create: Callable[[Session], Job]) -> Any:
    """Stage an upload as an import job (``create``, one transaction), hand it to the job runner
    and show its page; a refused upload (bad file, unknown bank) flashes why on the bank page."""
    try:
        with transaction(runtime().sessions) as db:
            job_id = create(db).id
    except (JobError, BlocklistError) as exc:
        flash(str(exc), "error")
        return redirect(url_for("banks.show", bank_id=bank_id))
    finally:
        upload.close()
    runner: JobRunner = current_app.extensions["moderation.jobs"]
    runner.submit(job_id)
    return redirect(url_for("banks.job", job_id=job_id))


@bp.route("/<int:bank_id>/import", methods=["POST"])
@bulk_upload
@permission_required("banks.write")
def import_archive(bank_id: int) -> Any:
    user = require_user()
    bank = _bank(bank_id)
    form = ImportForm()
    if not form.validate_on_submit():
        abort(400)
    rt = runtime()
    upload = form.archive.data
    return _start_job(
        bank_id,
        upload,
        lambda db: create_import_job(
            db,
            rt.settings,
            bank_name=bank.name,
            archive=upload.stream,
            filename=upload.filename or "archive.zip",
            created_by=user.actor,
            max_bytes=rt.settings.console_max_import_bytes,
            keyring=rt.keyring,
        ),
    )


@bp.route("/<int:bank_id>/import-hashes", methods=["POST"])
@bulk_upload
@permission_required("banks.write")
def import_hashes(bank_id: int) -> Any:
    user = require_user()
    bank = _bank(bank_id)
    form = HashListForm()
    if not form.validate_on_submit():
        abort(400)
    rt = runtime()
    upload = form.hashes.data
    return _start_job(
        bank_id,
        upload,
        lambda db: create_hash_import_job(
            db,
            rt.settings,
            bank_name=bank.name,
            upload=upload.stream,
            filename=upload.filename or "hashes.txt",
            fmt=form.format.data or "auto",
            created_by=user.actor,
            max_bytes=rt.settings.console_max_import_bytes,
            keyring=rt.keyring,
        ),
    )


@bp.route("/jobs/<job_id>")
@permission_required("banks.read")
def job(job_id: str) -> str:
    with runtime().sessions() as db:
        view = job_view(db, job_id, keyring=runtime().keyring)
        bank_id = (
            db.scalar(select(Bank.id).where(Bank.name == str(view.params.get("bank"))))
            if view
            else None
        )
    if view is None:
        abort(404)
    return render_template("banks/job.html", job=view, bank_id=bank_id)


@bp.route("/<int:bank_id>/enabled", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def bank_enabled(bank_id: int) -> Response:
    user = require_user()
    bank = _bank(bank_id)
    form = BankStateForm()
    if not form.validate_on_submit():
        abort(400)
    enabled = form.enabled.data == "1"
    set_bank_enabled(runtime(), bank.name, enabled=enabled, actor=user.actor)
    flash("Bank enabled." if enabled else "Bank disabled.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))


@bp.route("/<int:bank_id>/rename", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def rename(bank_id: int) -> Response:
    user = require_user()
    bank = _bank(bank_id)
    form = RenameBankForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        rename_bank(
            runtime(), bank.name, form.new_name.data or "", actor=user.actor, origin=origin()
        )
    except BlocklistError as exc:
        flash(str(exc), "error")
    else:
        flash("Bank renamed.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))


@bp.route("/<int:bank_id>/entries/<int:entry_id>/disabled", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def entry_disabled(bank_id: int, entry_id: int) -> Response:
    user = require_user()
    form = EntryStateForm()
    if not form.validate_on_submit():
        abort(400)
    with runtime().sessions() as db:
        entry = db.get(Entry, entry_id)
        if entry is None or entry.bank_id != bank_id:
            abort(404)
    disabled = form.disabled.data == "1"
    set_entry_disabled(runtime(), f"e_{entry_id}", disabled=disabled, actor=user.actor)
    flash(f"Entry e_{entry_id} {'disabled' if disabled else 'enabled'}.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))


@bp.route("/<int:bank_id>/entries/<int:entry_id>/quarantine", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def entry_quarantine(bank_id: int, entry_id: int) -> Response:
    user = require_user()
    form = QuarantineForm()
    if not form.validate_on_submit():
        abort(400)
    with runtime().sessions() as db:
        entry = db.get(Entry, entry_id)
        if entry is None or entry.bank_id != bank_id:
            abort(404)
    resolve = confirm_entry if form.outcome.data == "confirm" else release_entry
    try:
        result = resolve(runtime(), f"e_{entry_id}", actor=user.actor, origin=origin())
    except BlocklistError as exc:
        flash(str(exc), "error")
    else:
        flash(f"Entry e_{entry_id} {result['outcome']}.", "info")
    return redirect(url_for("banks.show", bank_id=bank_id))


@bp.route("/<int:bank_id>/entries/remove", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def remove_entries(bank_id: int) -> Response:
    user = require_user()
    _bank(bank_id)
    form = RemoveEntriesForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        with transaction(runtime().sessions) as db:
            request_removal(
                db,
                action=DELETE_ENTRIES,
                bank_id=bank_id,
                entry_ids=list(form.entry_ids.data or []),
                requested_by=user.id,
                origin=origin(),
            )
    except ApprovalError as exc:
        flash(str(exc), "error")
        return redirect(url_for("banks.show", bank_id=bank_id))
    flash("Removal requested: a second admin must approve it.", "info")
    return redirect(url_for("banks.approvals"))


@bp.route("/<int:bank_id>/delete", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def delete(bank_id: int) -> Response:
    user = require_user()
    bank = _bank(bank_id)
    form = DeleteBankForm()
    if not form.validate_on_submit():
        abort(400)
    if form.confirm_name.data != bank.name:
        flash("The name typed does not match the bank's name.", "error")
        return redirect(url_for("banks.show", bank_id=bank_id))
    with transaction(runtime().sessions) as db:
        request_removal(
            db, action=DELETE_BANK, bank_id=bank_id, requested_by=user.id, origin=origin()
        )
    flash("Deletion requested: a second admin must approve it.", "info")
    return redirect(url_for("banks.approvals"))


@bp.route("/approvals")
@permission_required("banks.read")
def approvals() -> str:
    with runtime().sessions() as db:
        pending = list_approvals(db, state="pending")
        recent = [a for a in list_approvals(db, state=None) if a.state != "pending"][:20]
    return render_template(
        "banks/approvals.html", pending=pending, recent=recent, form=VerdictForm()
    )


@bp.route("/approvals/<int:approval_id>", methods=["POST"])
@permission_required("banks.write")
@step_up_required
def decide_approval(approval_id: int) -> Response:
    def carry_out(user_id: int) -> str:
        version = approve(runtime(), approval_id, approver_id=user_id, origin=origin())
        return f"Approved and carried out (index version {version})."

    return settle_verdict(approval_id, carry_out, "banks.approvals")
