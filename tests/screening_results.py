"""A hand-made :class:`ScreeningResult` for tests that need one without a screener."""

from __future__ import annotations

from typing import Any

from moderation.matching.decision import ScreeningResult


def screening_result(decision: str, **fields: Any) -> ScreeningResult:
    """A result with ``decision``, no matches, ``{"total": 1.0}`` timings and ``fields``
    overriding any other field (``explanation``, ``score``, ``matches``, ...)."""
    defaults: dict[str, Any] = {
        "policy": "default",
        "score": None,
        "reason": None,
        "category": None,
        "matches": (),
        "timings_ms": {"total": 1.0},
        "encoder_id": "test",
        "index_version": 1,
        "classifier_version": None,
        "review_priority": None,
        "explanation": {},
    }
    return ScreeningResult(decision=decision, **{**defaults, **fields})
