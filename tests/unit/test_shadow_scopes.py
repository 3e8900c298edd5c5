"""The shadow screener of an encoder migration decides under the same tenant isolation as the
serving one: each upload's client scope reaches it (moderation.service.shadow.screen_shadow)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy.orm import Session

from moderation.matching.candidates import EVERY_BANK, Scope
from moderation.matching.decision import ScreeningResult
from moderation.matching.screening import Screener
from moderation.service.shadow import Shadow, screen_shadow


def _result(decision: str) -> ScreeningResult:
    return ScreeningResult(
        decision=decision,
        policy="default",
        score=None,
        reason=None,
        category=None,
        matches=(),
        timings_ms={},
        encoder_id="target",
        index_version=1,
        classifier_version=None,
        review_priority=None,
        explanation={},
    )


class _TargetScreener:
    """The target encoder's screener as far as the shadow uses it: blocks only uploads whose
    scope admits bank 1 (every bank, or a client's scope holding it)."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    def screen_bytes(
        self, items: Sequence[bytes], scopes: Sequence[Scope] | None = None
    ) -> list[ScreeningResult]:
        given = list(scopes) if scopes is not None else [EVERY_BANK] * len(items)
        self.scopes += given
        return [_result("block" if s.banks is None or 1 in s.banks else "allow") for s in given]


def test_the_shadow_screens_each_upload_under_its_clients_scope() -> None:
    target = _TargetScreener()
    shadow = Shadow("m1", cast(Screener, target))
    own, other = Scope(banks=frozenset({1})), Scope(banks=frozenset({2}))
    served = [_result("block"), _result("allow")]
    with Session() as session:
        rows = screen_shadow(session, shadow, ["u1", "u2"], [b"a", b"b"], served, [own, other])
        assert target.scopes == [own, other]
        # The other client's upload is not blocked by a bank it cannot see: both agree.
        assert [(r.decision, r.shadow_decision) for r in rows] == [
            ("block", "block"),
            ("allow", "allow"),
        ]
        assert all(cast(Any, r) in session.new for r in rows)
