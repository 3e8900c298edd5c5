"""Sign-in (password, then TOTP), sign-out, step-up re-authentication, users and accounts."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, session, url_for
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from admin import runtime
from admin.auth.forms import (
    CreateUserForm,
    LoginForm,
    PasswordResetForm,
    ReauthForm,
    RoleForm,
    TotpEnrolForm,
    TotpForm,
    TotpResetForm,
    UserStateForm,
)
from admin.extensions import limiter
from admin.permissions import (
    Principal,
    current_user,
    home_url,
    origin,
    permission_required,
    public,
    require_user,
    safe_next,
    step_up_required,
)
from admin.sessions import ServerSession, end_expired_sessions
from moderation.audit.log import record_event
from moderation.governance.users import (
    UserError,
    authenticate,
    create_user,
    enrol_totp,
    get_user_by_email,
    has_totp,
    list_users,
    reset_password,
    reset_totp,
    set_disabled,
    set_role,
    totp_required,
    verify_password,
    verify_totp,
)
from moderation.storage.db import transaction
from moderation.storage.models import User

bp = Blueprint("auth", __name__)

PENDING_TOTP_SECONDS = 300
"""The password step is good for this long while the TOTP code is entered."""
MAX_TOTP_FAILURES = 5
"""Wrong codes in one sign-in before the password must be entered again."""


def _login_limit() -> str:
    return runtime().settings.console_login_rate_limit


def _pending_user_key() -> str:
    return f"totp:{session.get('pending_user_id', '-')}"


def _server_session() -> ServerSession:
    current = session._get_current_object()  # type: ignore[attr-defined]
    assert isinstance(current, ServerSession)
    return current


@bp.before_app_request
def load_user() -> None:
    """Put the signed-in, still enabled user on ``g.user``; end the session otherwise."""
    g.user = None
    user_id = session.get("user_id")
    if not isinstance(user_id, int):
        return
    with runtime().sessions() as db:
        user = db.get(User, user_id)
        if user is None or user.disabled:
            _server_session().destroy()
            return
        g.user = Principal(user.id, user.email, user.role, has_totp(user))


@bp.app_context_processor
def inject_user() -> dict[str, Any]:
    """``current_user`` in every template (None when signed out)."""
    return {"current_user": g.get("user")}


def _fresh_server_session() -> None:
    # A new session id after each authentication step (session fixation, RELIABILITY.md W1).
    server = _server_session()
    server.regenerate()
    server.clear()


def _start_session(user: User) -> None:
    _fresh_server_session()
    session["user_id"] = user.id
    session["auth_at"] = time.time()


@bp.route("/")
@permission_required("account")
def index() -> Response:
    return redirect(home_url(current_user()))


def _refuse_login(db: Session, target: str | None, *, outcome: str, reason: str) -> None:
    record_event(
        db,
        actor="console",
        action="auth.login",
        target=target,
        origin=origin(),
        outcome=outcome,
        details={"reason": reason},
    )


def _record_own_step(db: Session, actor: str, action: str, *, ok: bool = True) -> None:
    """Audit one of a user's own sign-in steps: they are both actor and target."""
    record_event(
        db,
        actor=actor,
        action=action,
        target=actor,
        origin=origin(),
        outcome="success" if ok else "failure",
    )


def _await_totp(user: User, next_url: str | None) -> None:
    """The password step passed: hold the user as pending until the TOTP code is entered."""
    _fresh_server_session()
    session["pending_user_id"] = user.id
    session["pending_at"] = time.time()
    session["totp_failures"] = 0
    session["next"] = safe_next(next_url, "")


@bp.route("/login", methods=["GET", "POST"])
@public
@limiter.limit(_login_limit, methods=["POST"])
def login() -> Any:
    if request.method == "GET" and current_user() is not None:
        return redirect(home_url(current_user()))
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    if not form.validate_on_submit():
        return render_template(
            "auth/login.html", form=form
        ), 400 if request.method == "POST" else 200
    rt = runtime()
    end_expired_sessions(
        rt.sessions, idle=timedelta(minutes=rt.settings.console_session_idle_minutes)
    )
    with transaction(rt.sessions) as db:
        known = get_user_by_email(db, form.email.data or "")
        user = authenticate(db, form.email.data or "", form.password.data or "")
        target = f"user:{known.id}" if known is not None else None
        if user is None:
            _refuse_login(db, target, outcome="failure", reason="bad_credentials")
        elif totp_required(user) and not has_totp(user):
            _refuse_login(db, target, outcome="denied", reason="totp_not_enrolled")
            flash("Your role needs TOTP, which is not set up: ask an admin.", "error")
            return render_template("auth/login.html", form=form), 403
        elif has_totp(user):
            record_event(
                db, actor=f"user:{user.id}", action="auth.password", target=target, origin=origin()
            )
            _await_totp(user, form.next.data)
            return redirect(url_for("auth.totp"))
        else:
            record_event(
                db, actor=f"user:{user.id}", action="auth.login", target=target, origin=origin()
            )
            _start_session(user)
            principal = Principal(user.id, user.email, user.role, False)
            return redirect(safe_next(form.next.data, home_url(principal)))
    flash("Wrong e-mail or password.", "error")
    return render_template("auth/login.html", form=form), 200


@bp.route("/login/totp", methods=["GET", "POST"])
@public
@limiter.limit(_login_limit, methods=["POST"])
@limiter.limit(_login_limit, methods=["POST"], key_func=_pending_user_key)
def totp() -> Any:
    pending = session.get("pending_user_id")
    started = session.get("pending_at")
    if (
        not isinstance(pending, int)
        or not isinstance(started, int | float)
        or time.time() - started > PENDING_TOTP_SECONDS
    ):
        flash("Sign in again.", "warning")
        return redirect(url_for("auth.login"))
    form = TotpForm()
    if not form.validate_on_submit():
        return render_template(
            "auth/totp.html", form=form
        ), 400 if request.method == "POST" else 200
    rt = runtime()
    with transaction(rt.sessions) as db:
        ok = verify_totp(db, rt.keyring, pending, form.code.data or "")
        _record_own_step(db, f"user:{pending}", "auth.totp", ok=ok)
        user = db.get(User, pending) if ok else None
        if ok and user is not None:
            _record_own_step(db, f"user:{user.id}", "auth.login")
    if user is None:
        failures = int(session.get("totp_failures", 0)) + 1
        session["totp_failures"] = failures
        if failures >= MAX_TOTP_FAILURES:
            _server_session().destroy()
            flash("Too many wrong codes: sign in again.", "error")
            return redirect(url_for("auth.login"))
        flash("Wrong or already used code.", "error")
        return render_template("auth/totp.html", form=form), 200
    next_url = str(session.get("next") or "")
    _start_session(user)
    principal = Principal(user.id, user.email, user.role, True)
    return redirect(safe_next(next_url, home_url(principal)))


@bp.route("/logout", methods=["POST"])
@public
def logout() -> Response:
    # POST only, so CSRF protection applies: another site cannot sign a user out with a link
    # or an image (RELIABILITY.md S11); the page's button posts the form's CSRF token.
    user = current_user()
    if user is not None:
        with transaction(runtime().sessions) as db:
            _record_own_step(db, user.actor, "auth.logout")
    _server_session().destroy()
    flash("Signed out.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/reauth", methods=["GET", "POST"])
@permission_required("account")
@limiter.limit(_login_limit, methods=["POST"])
def reauth() -> Any:
    user = require_user()
    form = ReauthForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    if not form.validate_on_submit():
        return render_template("auth/reauth.html", form=form, user=user), (
            400 if request.method == "POST" else 200
        )
    rt = runtime()
    with transaction(rt.sessions) as db:
        row = db.get(User, user.id)
        ok = row is not None and verify_password(row, form.password.data or "")
        if ok and user.totp:
            ok = verify_totp(db, rt.keyring, user.id, form.code.data or "")
        _record_own_step(db, user.actor, "auth.reauth", ok=ok)
    if not ok:
        flash("That did not match.", "error")
        return render_template("auth/reauth.html", form=form, user=user), 200
    session["auth_at"] = time.time()
    return redirect(safe_next(form.next.data, home_url(user)))


@bp.route("/account", methods=["GET"])
@permission_required("account")
def account() -> str:
    return render_template("auth/account.html", user=require_user(), form=TotpEnrolForm())


@bp.route("/account/totp", methods=["POST"])
@permission_required("account")
@step_up_required
def account_totp() -> Any:
    user = require_user()
    form = TotpEnrolForm()
    if not form.validate_on_submit():
        return render_template("auth/account.html", user=user, form=form), 400
    rt = runtime()
    with transaction(rt.sessions) as db:
        row = db.get(User, user.id)
        assert row is not None
        uri = enrol_totp(db, rt.keyring, row, actor=user.actor)
    return render_template("auth/totp_enrolled.html", uri=uri, email=user.email)


@bp.route("/users", methods=["GET", "POST"])
@permission_required("users")
def users() -> Any:
    user = require_user()
    form = CreateUserForm()
    created = None
    status = 200
    if request.method == "POST":
        if form.validate_on_submit():
            rt = runtime()
            try:
                with transaction(rt.sessions) as db:
                    created = create_user(
                        db,
                        rt.keyring,
                        email=form.email.data or "",
                        role=form.role.data or "",
                        password=form.password.data or "",
                        totp=True if form.totp.data else None,
                        actor=user.actor,
                    )
            except UserError as exc:
                flash(str(exc), "error")
                status = 400
        else:
            status = 400
    with runtime().sessions() as db:
        rows = list_users(db)
        people = [
            {
                "id": u.id,
                "email": u.email,
                "role": u.role,
                "totp": has_totp(u),
                "disabled": u.disabled,
            }
            for u in rows
        ]
    return (
        render_template(
            "auth/users.html",
            form=form,
            people=people,
            created=created,
            state_form=UserStateForm(),
            role_form=RoleForm(),
            password_form=PasswordResetForm(),
            totp_form=TotpResetForm(),
        ),
        status,
    )


@bp.route("/users/<int:user_id>/disabled", methods=["POST"])
@permission_required("users")
@step_up_required
def user_disabled(user_id: int) -> Any:
    user = require_user()
    form = UserStateForm()
    if not form.validate_on_submit():
        abort(400)
    disabled = form.disabled.data == "1"
    if disabled and user_id == user.id:
        flash("You cannot disable yourself.", "error")
        return redirect(url_for("auth.users"))
    try:
        with transaction(runtime().sessions) as db:
            set_disabled(db, user_id, disabled=disabled, actor=user.actor)
    except UserError:
        abort(404)
    flash("User disabled." if disabled else "User enabled.", "info")
    return redirect(url_for("auth.users"))


@bp.route("/users/<int:user_id>/role", methods=["POST"])
@permission_required("users")
@step_up_required
def user_role(user_id: int) -> Any:
    user = require_user()
    form = RoleForm()
    if not form.validate_on_submit():
        abort(400)
    if user_id == user.id:
        flash("You cannot change your own role.", "error")
        return redirect(url_for("auth.users"))
    try:
        with transaction(runtime().sessions) as db:
            set_role(db, user_id, form.role.data or "", actor=user.actor, origin=origin())
    except UserError as exc:
        flash(str(exc), "error")
    else:
        flash("Role changed; the user's sessions ended.", "info")
    return redirect(url_for("auth.users"))


@bp.route("/users/<int:user_id>/password", methods=["POST"])
@permission_required("users")
@step_up_required
def user_password(user_id: int) -> Any:
    user = require_user()
    form = PasswordResetForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        with transaction(runtime().sessions) as db:
            reset_password(db, user_id, form.password.data or "", actor=user.actor, origin=origin())
    except UserError as exc:
        flash(str(exc), "error")
    else:
        flash("Password reset; the user's sessions ended.", "info")
    return redirect(url_for("auth.users"))


@bp.route("/users/<int:user_id>/totp", methods=["POST"])
@permission_required("users")
@step_up_required
def user_totp(user_id: int) -> Any:
    user = require_user()
    form = TotpResetForm()
    if not form.validate_on_submit():
        abort(400)
    rt = runtime()
    try:
        with transaction(rt.sessions) as db:
            uri = reset_totp(db, rt.keyring, user_id, actor=user.actor, origin=origin())
            target = db.get(User, user_id)
            email = target.email if target is not None else ""
    except UserError as exc:
        flash(str(exc), "error")
        return redirect(url_for("auth.users"))
    return render_template("auth/totp_enrolled.html", uri=uri, email=email)
