"""Activating a stored classifier model by version (``moderation classifier activate|rollback``).

Training (:func:`moderation.matching.classifier.training.train`) activates the model it fits
unless it is worse; these functions switch to a model already stored (an earlier one, to roll
back) through the same activation gate: the golden-set canary refuses a model below the policy's
SLOs (:func:`moderation.modelops.canary.canary_gate`). Workers pick the change up without a
restart (:func:`moderation.matching.classifier.model.active_model_version`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from moderation.audit.log import record_event
from moderation.matching.classifier.model import CopyModel
from moderation.storage.db import transaction
from moderation.storage.models import ClassifierModel

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

Gate = Callable[[CopyModel], tuple[bool, str, dict[str, Any]]]


class ActivationError(ValueError):
    """No such model, a model of another encoder, or nothing to roll back to."""


def rollback_target(runtime: Runtime) -> str:
    """The version a rollback activates: the newest model of this encoder stored before the
    active one.

    Raises:
        ActivationError: no active model, or none older.
    """
    encoder_id = str(runtime.encoder.id)
    with runtime.sessions() as session:
        models = session.scalars(
            select(ClassifierModel)
            .where(ClassifierModel.encoder_id == encoder_id)
            .order_by(ClassifierModel.created_at.desc(), ClassifierModel.version.desc())
        ).all()
    active = next((i for i, m in enumerate(models) if m.active), None)
    if active is None or active + 1 >= len(models):
        raise ActivationError("no earlier classifier model to roll back to")
    return models[active + 1].version


def activate_version(
    runtime: Runtime, version: str, *, actor: str, gate: Gate | None = None
) -> dict[str, Any]:
    """Make the stored model ``version`` the active one for this encoder, unless ``gate``
    refuses it; audited ``classifier.activate`` or ``classifier.refuse`` (with the gate's
    figures).

    Returns:
        ``{"version", "activated", "reason", "previous_version", "canary"}``.

    Raises:
        ActivationError: unknown version, or a model trained for another encoder.
    """
    encoder_id = str(runtime.encoder.id)
    with runtime.sessions() as session:
        row = session.scalar(select(ClassifierModel).where(ClassifierModel.version == version))
        if row is None:
            raise ActivationError(f"no classifier model {version!r} (moderation classifier list)")
        if row.encoder_id != encoder_id:
            raise ActivationError(f"model {version} was trained for encoder {row.encoder_id}")
        model = CopyModel.from_json(row.params)
        previous = session.scalar(
            select(ClassifierModel.version).where(
                ClassifierModel.active.is_(True), ClassifierModel.encoder_id == encoder_id
            )
        )
    allowed, reason, figures = gate(model) if gate is not None else (True, "no gate", {})
    with transaction(runtime.sessions) as session:
        if allowed:
            session.execute(
                update(ClassifierModel)
                .where(ClassifierModel.encoder_id == encoder_id)
                .values(active=False)
            )
            session.execute(
                update(ClassifierModel)
                .where(ClassifierModel.version == version)
                .values(active=True)
            )
        record_event(
            session,
            actor=actor,
            action="classifier.activate" if allowed else "classifier.refuse",
            target=f"classifier:{version}",
            outcome="success" if allowed else "denied",
            details={"reason": reason, "previous": previous, "canary": figures},
        )
    if allowed:
        runtime.notify_change("classifier")
    logger.info("classifier %s: %s (%s)", version, "activated" if allowed else "refused", reason)
    return {
        "version": version,
        "activated": allowed,
        "reason": reason,
        "previous_version": previous,
        "canary": figures,
    }
