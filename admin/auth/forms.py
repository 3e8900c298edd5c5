"""Forms of the auth area (Flask-WTF: each carries the ``csrf_token`` field)."""

from __future__ import annotations

from wtforms import BooleanField, HiddenField, PasswordField, SelectField, StringField
from wtforms.validators import AnyOf, DataRequired, Length, Optional, Regexp

from admin.forms import ConsoleForm
from moderation.governance.users import MAX_PASSWORD_LENGTH, ROLES


class LoginForm(ConsoleForm):
    email = StringField("E-mail", validators=[DataRequired(), Length(max=320)])
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=MAX_PASSWORD_LENGTH)]
    )
    next = HiddenField()


class TotpForm(ConsoleForm):
    code = StringField(
        "Code from your authenticator app",
        validators=[DataRequired(), Regexp(r"^\s*\d{3}\s?\d{3}\s*$", message="six digits")],
    )


class ReauthForm(ConsoleForm):
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=MAX_PASSWORD_LENGTH)]
    )
    code = StringField("TOTP code", validators=[Optional(), Regexp(r"^\s*\d{3}\s?\d{3}\s*$")])
    next = HiddenField()


class CreateUserForm(ConsoleForm):
    email = StringField("E-mail", validators=[DataRequired(), Length(max=320)])
    role = SelectField("Role", choices=list(ROLES), validators=[DataRequired()])
    password = PasswordField(
        "Initial password", validators=[DataRequired(), Length(max=MAX_PASSWORD_LENGTH)]
    )
    totp = BooleanField("Set up TOTP (always for admin and dpo)")


class UserStateForm(ConsoleForm):
    disabled = HiddenField(validators=[DataRequired(), AnyOf(["0", "1"])])


class RoleForm(ConsoleForm):
    role = SelectField("Role", choices=list(ROLES), validators=[DataRequired()])


class PasswordResetForm(ConsoleForm):
    password = PasswordField(
        "New password", validators=[DataRequired(), Length(max=MAX_PASSWORD_LENGTH)]
    )


class TotpResetForm(ConsoleForm):
    confirm = HiddenField(validators=[DataRequired(), AnyOf(["reset"])])


class TotpEnrolForm(ConsoleForm):
    confirm = HiddenField(validators=[DataRequired(), AnyOf(["enrol"])])


class LogoutForm(ConsoleForm):
    pass
