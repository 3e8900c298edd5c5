"""What ``moderation encoder status`` reports: the serving and shadowing encoders, the newest
migration's progress, how each bank is matched, shadow agreement by category, the workers'
encoders, and (on request) both encoders' golden-set canary figures.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.encoder_chains import encoder_chains, latest_migration
from moderation.banks.versions import current_snapshot
from moderation.storage.encoders import EncoderMigration, EntryOriginal, ShadowDecision
from moderation.storage.models import Bank, Entry, WorkerHeartbeat

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


def _migration(row: EncoderMigration | None) -> dict[str, Any] | None:
    if row is None:
        return None
    ratio = 1.0 if not row.total else row.done / row.total
    rate = row.done / row.embed_seconds if row.embed_seconds and row.done else None
    stamps = ("created_at", "updated_at", "promoted_at", "rolled_back_at")
    return {
        "id": row.id,
        "state": row.state,
        "source": row.source_name,
        "target": row.target_name,
        "target_id": row.target_id,
        "progress": {
            "done": row.done,
            "total": row.total,
            "ratio": round(ratio, 4),
            "without_originals": row.without_originals,
            "entries_per_second": None if rate is None else round(rate, 2),
        },
        "error": row.error,
        "created_by": row.created_by,
        **{k: (getattr(row, k).isoformat() if getattr(row, k) else None) for k in stamps},
    }


def _banks(session: Session, shadowing: bool, promoted: bool) -> list[dict[str, Any]]:
    """Each bank: whether it keeps originals, and how the target encoder will match it."""
    images = dict(
        session.execute(
            select(Entry.bank_id, func.count())
            .where(Entry.origin == "image")
            .group_by(Entry.bank_id)
        ).all()
    )
    kept = dict(
        session.execute(
            select(Entry.bank_id, func.count())
            .join(EntryOriginal, EntryOriginal.entry_id == Entry.id)
            .group_by(Entry.bank_id)
        ).all()
    )
    out = []
    for bank in session.scalars(select(Bank).order_by(Bank.name)):
        n_images, n_kept = int(images.get(bank.id, 0)), int(kept.get(bank.id, 0))
        if n_kept >= n_images or not (shadowing or promoted):
            matched = "embeddings and PDQ"
        elif promoted:
            matched = "PDQ only for entries without an original (no embedding with this encoder)"
        else:
            matched = (
                "PDQ and the current encoder until promotion; after it, PDQ only for entries "
                "without an original"
            )
        out.append(
            {
                "bank": bank.name,
                "category": bank.category,
                "retain_originals": bank.retain_originals,
                "image_entries": n_images,
                "originals": n_kept,
                "matched_by": matched,
            }
        )
    return out


def shadow_agreement(session: Session, migration_id: str) -> dict[str, Any]:
    """Uploads screened in shadow by migration ``migration_id``: how many, how many the target
    would decide differently, by category, and each change (``"allow->review"``: count)."""
    rows = session.execute(
        select(
            ShadowDecision.category, ShadowDecision.decision, ShadowDecision.shadow_decision
        ).where(ShadowDecision.migration_id == migration_id)
    ).all()
    by_category: dict[str, dict[str, Any]] = {}
    for category, decision, shadow in rows:
        entry = by_category.setdefault(category, {"uploads": 0, "changed": 0, "changes": Counter()})
        entry["uploads"] += 1
        if decision != shadow:
            entry["changed"] += 1
            entry["changes"][f"{decision}->{shadow}"] += 1
    total, changed = len(rows), sum(c["changed"] for c in by_category.values())
    return {
        "uploads": total,
        "changed": changed,
        "agreement": None if not total else round(1 - changed / total, 4),
        "by_category": {
            k: {**v, "changes": dict(v["changes"])} for k, v in sorted(by_category.items())
        },
    }


def _workers(session: Session, alive_within: float) -> list[dict[str, Any]]:
    since = datetime.now(UTC) - timedelta(seconds=alive_within)
    beats = session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.updated_at >= since)
        .order_by(WorkerHeartbeat.id)
    )
    return [
        {"worker": b.id, "encoder_id": b.encoder_id, "snapshot_version": b.snapshot_version}
        for b in beats
    ]


def _canary(runtime: Runtime, name: str | None) -> dict[str, Any] | None:
    """One encoder's canary figures, or why there are none."""
    if name is None:
        return None
    from moderation.modelops.encoder_promotion import PromotionRefused, canary_gate

    try:
        figures = canary_gate(runtime, name)
    except PromotionRefused as exc:
        return {**exc.figures, "passed_slo": False, "refusal": str(exc)[:1000]}
    except Exception as exc:  # a status page must not fail on the canary
        logger.warning("canary for %s failed: %s", name, exc)
        return {"error": str(exc)[:500]}
    return figures


def encoder_status(runtime: Runtime, *, canary: bool = False) -> dict[str, Any]:
    """The whole status as JSON-ready values (see the module docstring); ``canary`` runs the
    golden-set canary for both the serving and the target encoder."""
    with runtime.sessions() as session:
        row = latest_migration(session)
        chains = encoder_chains(session)
        serving = current_snapshot(session)
        shadowing = chains.shadow_name is not None
        status: dict[str, Any] = {
            "serving": chains.serving_name or runtime.settings.encoder,
            "serving_snapshot": None if serving is None else serving.version,
            "shadow": chains.shadow_name,
            "migration": _migration(row),
            "banks": _banks(session, shadowing, row is not None and row.state == "promoted"),
            "shadow_agreement": None if row is None else shadow_agreement(session, row.id),
            "workers": _workers(session, 3 * runtime.settings.snapshot_poll_interval + 30),
        }
    if canary and row is not None:
        status["canary"] = {
            "source": {"encoder": row.source_name, **(_canary(runtime, row.source_name) or {})},
            "target": {"encoder": row.target_name, **(_canary(runtime, row.target_name) or {})},
        }
    return status


def migration_progress(session: Session) -> dict[str, float]:
    """``{target encoder: done/total}`` of the newest migration (empty without one), for the
    ``moderation_encoder_migration_progress_ratio`` gauge."""
    row = latest_migration(session)
    if row is None:
        return {}
    return {row.target_name: 1.0 if not row.total else row.done / row.total}
