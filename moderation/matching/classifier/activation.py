"""Switching the active classifier model to a stored one (``moderation classifier
activate|rollback``).

Training (:func:`moderation.matching.classifier.training.train`) activates the model it fits
unless it is worse; :func:`activate_model` switches to a model already stored, and
:func:`rollback_model` to an earlier one (default: the newest stored before the active one), both
through the same activation gate as training: the golden-set canary refuses a model below the
policy's SLOs (:func:`moderation.modelops.canary.canary_gate`). Workers pick the change up without
a restart (:func:`moderation.matching.classifier.model.active_model_version`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.matching.classifier.model import CopyModel, ModelFormatError
from moderation.storage.db import transaction
from moderation.storage.models import ClassifierModel

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

Gate = Callable[[CopyModel], tuple[bool, str, dict[str, Any]]]
"""Decides whether a model may become active: ``(allowed, reason, figures)``."""


class ActivationError(ValueError):
    """No such model, a model of another encoder, an unreadable one, or nothing to roll back
    to."""


def rollback_target(session: Session, encoder_id: str, to: str | None = None) -> str:
    """The version a rollback activates: ``to`` when given, else the newest model of
    ``encoder_id`` stored before the active one.

    Raises:
        ActivationError: ``to`` is unknown or of another encoder; no model is active (and no
            ``to``); no older model.
    """
    if to is not None:
        target = session.get(ClassifierModel, to)
        if target is None or target.encoder_id != encoder_id:
            raise ActivationError(f"no stored model {to!r} for encoder {encoder_id}")
        return to
    current = _active(session, encoder_id)
    if current is None:
        raise ActivationError("no model is active: name the version to activate (--to)")
    older = session.scalar(
        select(ClassifierModel.version)
        .where(
            ClassifierModel.encoder_id == encoder_id,
            ClassifierModel.created_at < current.created_at,
        )
        .order_by(ClassifierModel.created_at.desc(), ClassifierModel.version.desc())
        .limit(1)
    )
    if older is None:
        raise ActivationError(f"no model older than the active {current.version}")
    return older


def _active(session: Session, encoder_id: str) -> ClassifierModel | None:
    return session.scalar(
        select(ClassifierModel).where(
            ClassifierModel.active.is_(True), ClassifierModel.encoder_id == encoder_id
        )
    )


def _stored_model(session: Session, version: str, encoder_id: str) -> CopyModel:
    row = session.get(ClassifierModel, version)
    if row is None:
        raise ActivationError(f"no classifier model {version!r} (moderation classifier list)")
    if row.encoder_id != encoder_id:
        raise ActivationError(f"model {version} was trained for encoder {row.encoder_id}")
    try:
        return CopyModel.from_json(row.params)
    except ModelFormatError as exc:
        raise ActivationError(f"model {version} cannot be read: {exc}") from exc


def activate_model(
    runtime: Runtime,
    version: str,
    *,
    actor: str,
    gate: Gate | None = None,
    action: str = "classifier.activate",
    origin: str | None = None,
) -> dict[str, Any]:
    """Make the stored model ``version`` the active one for the serving encoder, unless
    ``gate`` refuses it; audited ``action`` (``classifier.activate`` or ``classifier.rollback``)
    or ``classifier.refuse`` (with the gate's reason and figures). Notifies a ``classifier``
    change (the canary's change check) when activated.

    Returns:
        ``{"previous", "active", "activated", "reason", "canary"}``: the versions active before
        and after (``previous`` None when none was), whether ``version`` was activated, the
        gate's reason and canary figures (``{}`` when not measured).

    Raises:
        ActivationError: unknown version, a model trained for another encoder, or an unreadable
            one.
    """
    encoder_id = str(runtime.encoder.id)
    with runtime.sessions() as session:
        model = _stored_model(session, version, encoder_id)
        current = _active(session, encoder_id)
        previous = current.version if current is not None else None
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
            action=action if allowed else "classifier.refuse",
            target=f"classifier:{version}",
            outcome="success" if allowed else "denied",
            origin=origin,
            details={"reason": reason, "previous": previous, "canary": figures},
        )
    if allowed:
        runtime.notify_change("classifier")
    logger.info("classifier %s: %s (%s)", version, "activated" if allowed else "refused", reason)
    return {
        "previous": previous,
        "active": version if allowed else previous,
        "activated": allowed,
        "reason": reason,
        "canary": figures,
    }


def rollback_model(
    runtime: Runtime,
    *,
    actor: str,
    to: str | None = None,
    gate: Gate | None = None,
    origin: str | None = None,
) -> dict[str, Any]:
    """Activate model ``to`` (default: the newest one of the serving encoder stored before the
    active one, :func:`rollback_target`) through :func:`activate_model`, audited
    ``classifier.rollback``.

    Returns:
        As :func:`activate_model`.

    Raises:
        ActivationError: as :func:`rollback_target` and :func:`activate_model`.
    """
    with runtime.sessions() as session:
        version = rollback_target(session, str(runtime.encoder.id), to)
    return activate_model(
        runtime, version, actor=actor, gate=gate, action="classifier.rollback", origin=origin
    )
