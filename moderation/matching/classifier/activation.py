"""Classifier rollback: make an earlier stored model the active one again.

Training (:mod:`moderation.matching.classifier.training`) activates a new model unless it is
worse on held-out pairs; a model that turns out bad in production is rolled back here by an admin
(``moderation classifier rollback``). Workers poll the active version
(:func:`~moderation.matching.classifier.model.active_model_version`) and switch without a
restart. With a ``gate`` (the golden-set canary's,
:func:`moderation.modelops.canary.canary_gate`) a model whose canary figures miss the policy's
SLOs is refused instead (audited ``classifier.refuse`` with the figures).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.matching.classifier.model import CopyModel
from moderation.storage.models import ClassifierModel

Verdict = tuple[bool, str, dict[str, Any]]
"""``(allowed, reason, figures)`` of an activation gate (the canary's) on the target model."""


class RollbackError(Exception):
    """No model to roll back to (unknown version, other encoder, nothing older)."""


def _active(session: Session, encoder_id: str) -> ClassifierModel | None:
    """The active classifier model of ``encoder_id``, if any."""
    return session.scalar(
        select(ClassifierModel).where(
            ClassifierModel.active.is_(True), ClassifierModel.encoder_id == encoder_id
        )
    )


def rollback_model(
    session: Session,
    *,
    encoder_id: str,
    to: str | None = None,
    actor: str,
    origin: str | None = None,
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    """Activate model ``to`` (default: the newest model of ``encoder_id`` older than the active
    one) for ``encoder_id``, unless ``verdict`` (the gate's, run on :func:`rollback_target`'s
    model before this transaction: the canary screens for a while) refuses it; audited
    ``classifier.rollback`` (or ``classifier.refuse``). Returns ``{"previous", "active"}``
    (versions; ``previous`` None when no model was active), plus ``canary`` (the gate's
    figures) and, when refused, ``refused`` (the target's version) and ``reason``.

    Raises:
        RollbackError: unknown version, a model of another encoder, or no older model.
    """
    current = _active(session, encoder_id)
    target = _target(session, encoder_id, current, to)
    previous = current.version if current is not None else None
    allowed, reason, figures = verdict or (True, "no gate", {})
    if not allowed:
        record_event(
            session,
            actor=actor,
            action="classifier.refuse",
            target=f"classifier:{target.version}",
            outcome="denied",
            origin=origin,
            details={"reason": reason, "previous": previous, "canary": figures},
        )
        return {
            "previous": previous,
            "active": previous,
            "refused": target.version,
            "reason": reason,
            "canary": figures,
        }
    session.execute(
        update(ClassifierModel).where(ClassifierModel.encoder_id == encoder_id).values(active=False)
    )
    target.active = True
    record_event(
        session,
        actor=actor,
        action="classifier.rollback",
        target=f"classifier:{target.version}",
        origin=origin,
        details={"previous": previous, "reason": reason, "canary": figures},
    )
    return {
        "previous": previous,
        "active": target.version,
        **({"canary": figures} if figures else {}),
    }


def rollback_target(session: Session, *, encoder_id: str, to: str | None = None) -> CopyModel:
    """The model :func:`rollback_model` would activate (to run the gate on it first).

    Raises:
        RollbackError: unknown version, a model of another encoder, or no older model.
        moderation.matching.classifier.model.ModelFormatError: the stored model is unreadable.
    """
    current = session.scalar(
        select(ClassifierModel).where(
            ClassifierModel.active.is_(True), ClassifierModel.encoder_id == encoder_id
        )
    )
    return CopyModel.from_json(_target(session, encoder_id, current, to).params)


def _target(
    session: Session, encoder_id: str, current: ClassifierModel | None, to: str | None
) -> ClassifierModel:
    """The model a rollback activates: ``to``, else the newest one older than ``current``.

    Raises:
        RollbackError: unknown version, a model of another encoder, or no older model.
    """
    if to is not None:
        target = session.get(ClassifierModel, to)
        if target is None or target.encoder_id != encoder_id:
            raise RollbackError(f"no stored model {to!r} for encoder {encoder_id}")
    else:
        if current is None:
            raise RollbackError("no model is active: name the version to activate (--to)")
        target = session.scalar(
            select(ClassifierModel)
            .where(
                ClassifierModel.encoder_id == encoder_id,
                ClassifierModel.created_at < current.created_at,
            )
            .order_by(ClassifierModel.created_at.desc())
            .limit(1)
        )
        if target is None:
            raise RollbackError(f"no model older than the active {current.version}")
    return target
