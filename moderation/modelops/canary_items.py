"""Operator-labelled files for the golden set (``moderation canary add``) and its listing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from moderation.audit.log import record_event
from moderation.banks.records import UnknownBankError, get_bank
from moderation.matching.golden import LABELS, add_item, png_bytes, usable_items
from moderation.media.decode import UnscannableImage, decode_image
from moderation.storage.db import transaction
from moderation.storage.modelops import CanaryItem

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime


class CanaryItemError(ValueError):
    """A file cannot join the golden set (undecodable, unknown bank, bad label)."""


def add_labelled_file(
    runtime: Runtime, path: Path, *, label: str, bank: str | None, actor: str
) -> str:
    """Decode ``path`` and add it to the golden set as ``label`` (``match``: a copy of something
    in ``bank``, or in any block bank without one; ``no-match``: must match nothing), sealed
    like every golden image; audited ``canary.item_added``. Returns the item id.

    Raises:
        CanaryItemError: bad label, undecodable file, or unknown bank.
    """
    if label not in LABELS:
        raise CanaryItemError(f"label must be one of {LABELS}, got {label!r}")
    if bank is not None and label != "match":
        raise CanaryItemError("--bank only applies to --label match")
    try:
        decoded = decode_image(path.read_bytes(), runtime.limits)
    except (UnscannableImage, OSError) as exc:
        raise CanaryItemError(f"{path}: not a usable image: {exc}") from exc
    with transaction(runtime.sessions) as session:
        bank_id = None
        if bank is not None:
            try:
                bank_id = get_bank(session, bank).id
            except UnknownBankError as exc:
                raise CanaryItemError(str(exc)) from exc
        item = add_item(
            session,
            runtime.keyring,
            runtime.settings.resolved_data_dir,
            png_bytes(decoded.frames[0]),
            origin="operator",
            label=label,
            bank_id=bank_id,
            edit="operator",
            added_by=actor,
        )
        record_event(
            session,
            actor=actor,
            action="canary.item_added",
            target=f"canary:{item.id}",
            details={"origin": "operator", "label": label, "bank": bank, "file": path.name},
        )
        return item.id


def golden_status(runtime: Runtime) -> dict[str, Any]:
    """The golden set's size by origin and label (items and usable ones)."""
    with runtime.sessions() as session:
        every = session.scalars(select(CanaryItem)).all()
        usable = usable_items(session)
    counts: dict[str, int] = {}
    for item in every:
        key = f"{item.origin}/{item.label}"
        counts[key] = counts.get(key, 0) + 1
    return {"items": len(every), "usable": len(usable), "by_origin_label": counts}
