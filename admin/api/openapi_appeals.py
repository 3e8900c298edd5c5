"""The appeal endpoint and the statement-of-reasons schemas of the OpenAPI document
(:mod:`admin.api.openapi`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def statement_schema() -> dict[str, Any]:
    """``result.statement_of_reasons``: the current decision's DSA statement of reasons."""
    return {
        "type": "object",
        "description": "The upload's current decision (screening, reviewer or appeal) with its "
        "statement-of-reasons fields (EU DSA Art. 17).",
        "properties": {
            "decision": {"enum": ["allow", "review", "block", "unscannable"]},
            "source": {"enum": ["screening", "review", "appeal"]},
            "decision_ground": {
                "enum": ["illegal_content", "incompatible_with_terms", None],
                "description": "From the category's policy; null unless blocked.",
            },
            "automated_detection": {"type": "boolean"},
            "automated_decision": {
                "type": "boolean",
                "description": "False when a person (reviewer, appeal) decided.",
            },
            "content_type": {"const": "image"},
            "category": {"type": ["string", "null"]},
            "decided_at": {"type": "string", "format": "date-time"},
        },
    }


def appeal_schema() -> dict[str, Any]:
    """An appeal as the API and callbacks show it."""
    return {
        "type": "object",
        "required": ["id", "state", "original_decision"],
        "properties": {
            "id": {"type": "string"},
            "state": {"enum": ["open", "claimed", "decided"]},
            "reason": {"type": "string"},
            "original_decision": {"enum": ["allow", "block"]},
            "outcome": {"enum": ["upheld", "overturned", None]},
            "decision": {
                "enum": ["allow", "block", None],
                "description": "The upload's decision after the appeal; null until decided.",
            },
            "created_at": {"type": "string", "format": "date-time"},
            "decided_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }


def appeal_operation(_error: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """``POST /api/v1/screenings/{id}/appeal``; ``_error`` builds an error response."""
    reason = {"type": "string", "minLength": 1, "maxLength": 2000}
    body = {"type": "object", "required": ["reason"], "properties": {"reason": reason}}
    return {
        "operationId": "appealScreening",
        "description": "Appeal the screening's current block or allow decision. A reviewer "
        "other than the one who decided settles it; the outcome comes by signed callback "
        "(event appeal.decided) and in GET's `appeal`. One appeal per decision; an appeal's "
        "outcome is final.",
        "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body},
                "application/x-www-form-urlencoded": {"schema": body},
            },
        },
        "responses": {
            "201": {
                "description": "Appeal filed.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Appeal"}}
                },
            },
            "400": _error("reason missing or over 2000 characters."),
            "401": _error("Missing or invalid bearer token."),
            "404": _error("No such screening for this client."),
            "409": _error(
                "Not decided yet (queued, in review, unscannable), already appealed, "
                "or the decision is an appeal's outcome."
            ),
            "429": _error("Rate limited; see Retry-After."),
        },
    }
