"""The base class of every console form: Flask-WTF's ``FlaskForm`` (CSRF field ``csrf_token``).

Flask-WTF ships no type hints; under type checking a typed stand-in with the members the views
use takes its place, so forms can be declared without subclassing ``Any``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    class ConsoleForm:
        errors: dict[str, list[str]]
        data: dict[str, Any]

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        def validate_on_submit(self, extra_validators: Any = None) -> bool: ...

        def __getattr__(self, name: str) -> Any: ...

else:
    from flask_wtf import FlaskForm as ConsoleForm

__all__ = ["ConsoleForm"]
