"""Promotion and rollback of an encoder migration (``moderation encoder promote|rollback``).

Both are one row update, audited: the newest migration's state decides which chain serves
(:mod:`moderation.banks.encoder_chains`). Every running worker notices at its next snapshot
check (``snapshot_poll_interval``), builds the other encoder's screener while the old one keeps
screening, and swaps them between tasks (:class:`moderation.service.worker.WorkerState`): no
restart, and no moment without a bank. Rollback leaves both chains in place, so promoting again
needs no rebuild.

Promotion is gated on the golden-set canary (:func:`canary_gate`): an encoder below the
policy's SLOs is refused with its figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from moderation.audit.log import record_event
from moderation.banks.encoder_chains import latest_migration
from moderation.modelops.encoder_migration import MigrationError, run_migration
from moderation.storage.db import transaction

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


class PromotionRefused(MigrationError):
    """The target encoder is below the canary SLOs; ``figures`` holds the canary report."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


@dataclass(frozen=True)
class Switch:
    """The outcome of a promotion or rollback: the migration, its new state, the encoder that
    serves now, and the canary figures the gate saw (None without a canary)."""

    migration_id: str
    state: str
    serving: str
    canary: dict[str, Any] | None = None


def canary_gate(runtime: Runtime, encoder_name: str) -> dict[str, Any]:
    """Run the golden-set canary (:mod:`moderation.modelops.canary`) for ``encoder_name``
    against its own snapshot chain and refuse below the policy's SLOs (``slo.min_recall``,
    ``slo.max_false_positive_rate``). Returns the figures (``CanaryReport.to_json``).

    Raises:
        PromotionRefused: below the SLOs, or the canary cannot run (no golden set, no snapshot
            for that encoder): fail closed; the message and ``figures`` carry the canary figures.
    """
    from moderation.modelops.canary import CanaryError, SloViolation, check_slo, run_canary

    try:
        report = run_canary(runtime, encoder_name=encoder_name)
    except CanaryError as exc:
        raise PromotionRefused(f"the canary cannot measure {encoder_name}: {exc}") from exc
    figures = report.to_json()
    try:
        check_slo(report, runtime.policy)
    except SloViolation as exc:
        raise PromotionRefused(f"{encoder_name} is below the canary SLOs: {exc}", figures) from exc
    return figures


def promote(
    runtime: Runtime,
    *,
    actor: str,
    origin: str | None = None,
) -> Switch:
    """Serve with the newest migration's target (audited as ``encoder.promote``, the canary
    figures included). Originals added since the migration became ready are embedded first.

    Raises:
        MigrationError: no migration ready (or rolled back) to promote.
        PromotionRefused: the canary gate refused (audited as a refused ``encoder.promote``).
    """
    with runtime.sessions() as session:
        row = latest_migration(session)
        if row is None or row.state not in ("ready", "rolled_back"):
            state = "none" if row is None else row.state
            raise MigrationError(f"no encoder migration ready to promote (newest: {state})")
        migration_id, target = row.id, row.target_name
    run_migration(runtime, migration_id, actor=actor)
    try:
        figures = canary_gate(runtime, target)
    except PromotionRefused as exc:
        _refused(runtime, migration_id, actor=actor, origin=origin, exc=exc)
        raise
    return _switch(runtime, migration_id, "promoted", actor=actor, origin=origin, canary=figures)


def _refused(
    runtime: Runtime, migration_id: str, *, actor: str, origin: str | None, exc: PromotionRefused
) -> None:
    with transaction(runtime.sessions) as session:
        record_event(
            session,
            actor=actor,
            action="encoder.promote",
            target=f"encoder_migration:{migration_id}",
            origin=origin,
            outcome="refused",
            details={"reason": str(exc)[:500], "canary": _jsonable(exc.figures)},
        )


def rollback(runtime: Runtime, *, actor: str, origin: str | None = None) -> Switch:
    """Serve with the promoted migration's source encoder again (audited as
    ``encoder.rollback``); both snapshot chains are kept.

    Raises:
        MigrationError: the newest migration is not promoted.
    """
    with runtime.sessions() as session:
        row = latest_migration(session)
        if row is None or row.state != "promoted":
            state = "none" if row is None else row.state
            raise MigrationError(f"no promoted encoder migration to roll back (newest: {state})")
        migration_id = row.id
    return _switch(runtime, migration_id, "rolled_back", actor=actor, origin=origin)


def _switch(
    runtime: Runtime,
    migration_id: str,
    state: str,
    *,
    actor: str,
    origin: str | None,
    canary: dict[str, Any] | None = None,
) -> Switch:
    """Set the migration's state (which picks the serving chain) with its audit event."""
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        row = latest_migration(session)
        if row is None or row.id != migration_id:
            raise MigrationError("another encoder migration started meanwhile")
        row.state, row.updated_at = state, now
        if state == "promoted":
            row.promoted_at = now
        else:
            row.rolled_back_at = now
        serving = row.target_name if state == "promoted" else row.source_name
        record_event(
            session,
            actor=actor,
            action="encoder.promote" if state == "promoted" else "encoder.rollback",
            target=f"encoder_migration:{row.id}",
            origin=origin,
            details={"serving": serving, "canary": _jsonable(canary)},
        )
    logger.info("encoder migration %s %s: %s serves", migration_id, state, serving)
    runtime.notify_change("encoder")  # the canary measures the encoder that serves now
    return Switch(migration_id, state, serving, canary)


def _jsonable(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    """Canary figures as JSON-safe values (tuples as lists, the rest as they are)."""
    if figures is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in figures.items()}
