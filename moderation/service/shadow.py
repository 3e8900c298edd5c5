"""Shadow screening during an encoder migration: the serving screener decides, the target
encoder's screener screens the same bytes and its decision is recorded beside it.

The shadow never changes what is recorded for the upload or sent to the platform: any failure
of the shadow screener is logged and the batch goes on. Each shadow decision is a
:class:`~moderation.storage.encoders.ShadowDecision` row (``moderation encoder status`` reads
agreement from them, :mod:`moderation.modelops.encoder_migration_status`) and a sample of
``moderation_shadow_decisions_total{category,agreement}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from sqlalchemy.orm import Session

from moderation.matching.candidates import Scope
from moderation.matching.decision import ScreeningResult
from moderation.matching.screening import Screener
from moderation.storage.encoders import ShadowDecision

logger = logging.getLogger(__name__)

SHADOW_DECISIONS = Counter(
    "moderation_shadow_decisions",
    "Uploads screened by an encoder migration's target beside the serving encoder, by the "
    "match's bank category and whether the target's decision agrees (agree, disagree).",
    ["category", "agreement"],
)
SHADOW_SECONDS = Histogram(
    "moderation_shadow_seconds",
    "Time the shadow (target encoder) screening added to one batch, seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


@dataclass(frozen=True)
class Shadow:
    """The migration whose target shadows, and that target's screener."""

    migration_id: str
    screener: Screener


def category_of(result: ScreeningResult, shadow: ScreeningResult) -> str:
    """The bank category a disagreement is counted under: the serving decision's match, else
    the shadow's, else ``"none"``."""
    return result.category or shadow.category or "none"


def screen_shadow(
    session: Session,
    shadow: Shadow,
    upload_ids: Sequence[str],
    data: Sequence[bytes],
    results: Sequence[ScreeningResult],
    scopes: Sequence[Scope] | None = None,
) -> list[ShadowDecision]:
    """Screen ``data`` with the shadow and add one :class:`ShadowDecision` per upload to
    ``session`` (the caller's transaction, the one recording ``results``). ``scopes`` (one per
    item, as given to the serving screener) limits each upload to its client's banks and
    policy, so both encoders decide under the same tenant isolation. Returns the rows; none
    when the shadow failed (logged; serving is unaffected)."""
    start = time.perf_counter()
    try:
        shadowed = shadow.screener.screen_bytes(list(data), scopes)
    except Exception:  # the shadow must never fail a serving decision
        logger.exception("shadow screening failed (migration %s)", shadow.migration_id)
        return []
    SHADOW_SECONDS.observe(time.perf_counter() - start)
    rows = []
    for upload_id, result, other in zip(upload_ids, results, shadowed, strict=True):
        category = category_of(result, other)
        agreement = "agree" if result.decision == other.decision else "disagree"
        SHADOW_DECISIONS.labels(category, agreement).inc()
        rows.append(
            ShadowDecision(
                migration_id=shadow.migration_id,
                upload_id=upload_id,
                category=category,
                decision=result.decision,
                shadow_decision=other.decision,
            )
        )
    session.add_all(rows)
    return rows
