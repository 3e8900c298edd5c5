"""The golden set: labelled images the canary (:mod:`moderation.modelops.canary`) screens.

It holds edited copies of bank images made at import, while the originals are still in memory
(the classifier's edit families, :func:`moderation.matching.classifier.synthetic.training_copy`,
drawn with *canary* seeds: never a training or benchmark seed), negatives (edited background
photos, never bank images) and operator-labelled files (``moderation canary add``). Each image is
a PNG sealed under its own data key in ``<data_dir>/canary`` (:func:`moderation.crypto.envelope.
seal_blob`); its :class:`~moderation.storage.models.CanaryItem` row holds the wrapped key, so
removing the entry it was made from (ON DELETE CASCADE) crypto-shreds it. The set lives here,
below the service layer, because the bank import's hooks (:meth:`moderation.service.runtime.
Runtime.import_hooks`) fill it.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.importer import ImportHooks
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.keys import KeyRing
from moderation.matching.classifier.synthetic import background_images, training_copy
from moderation.matching.policy import PDQ_MATCH_DISTANCE
from moderation.media.edits import EDITS, derived_seed
from moderation.signals.pdq import hamming_distance, pdq_hash
from moderation.storage.db import transaction
from moderation.storage.modelops import CanaryItem
from moderation.storage.models import Entry, new_uuid

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

LABELS = ("match", "no-match")
MAX_SIDE = 512
"""Long side (px) a golden image is stored at: the encoders see 224 px, PDQ 512 px."""


def golden_dir(data_dir: Path) -> Path:
    """``<data_dir>/canary``: the sealed golden-set images."""
    return data_dir / "canary"


def canary_seed(key: str, edit: str, index: int) -> int:
    """Seed of the ``index``-th canary copy of the image ``key`` (its SHA-256): derived for the
    purpose ``"canary"``, so never a training (``"train"``) or benchmark (``"query"``) seed."""
    material = int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")
    return derived_seed("canary", material, edit, index)


def canary_edits(index: int, count: int) -> list[str]:
    """The ``count`` edit families of the ``index``-th imported image: round robin over every
    family, starting half-way round from the training copies' (so an image's canary copy is
    usually of a family its training copies are not)."""
    names = list(EDITS)
    offset = len(names) // 2
    return [names[(offset + index * count + j) % len(names)] for j in range(count)]


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG, its long side at most :data:`MAX_SIDE` px."""
    rgb = image.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def item_context(item_id: str) -> str:
    """The wrap context of a golden-set item's data key (also used by key rotation)."""
    return f"canary:{item_id}"


def add_item(
    session: Session,
    keyring: KeyRing,
    data_dir: Path,
    data: bytes,
    *,
    origin: str,
    label: str,
    entry_id: int | None = None,
    bank_id: int | None = None,
    edit: str = "",
    added_by: str = "cli",
) -> CanaryItem:
    """Seal ``data`` (an encoded image) to a new blob and add its row to ``session``.

    Raises:
        ValueError: ``label`` is not ``match`` or ``no-match``.
        OSError: the blob cannot be written.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    item_id = new_uuid()
    sealed, wrapped = seal_blob(data, keyring, context=item_context(item_id))
    directory = golden_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    from moderation.crypto.files import write_private_file

    write_private_file(directory / f"{item_id}.blob", [sealed])
    item = CanaryItem(
        id=item_id,
        origin=origin,
        label=label,
        entry_id=entry_id,
        bank_id=bank_id,
        edit=edit,
        blob_ref=f"{item_id}.blob",
        wrapped_key=wrapped.to_bytes(),
        added_by=added_by,
    )
    session.add(item)
    return item


def read_item(item: CanaryItem, keyring: KeyRing, data_dir: Path) -> bytes:
    """The decrypted image bytes of ``item``.

    Raises:
        OSError: the blob is missing.
        moderation.crypto.errors.CryptoError: it does not authenticate.
    """
    sealed = (golden_dir(data_dir) / item.blob_ref).read_bytes()
    return open_blob(
        sealed, WrappedKey.from_bytes(item.wrapped_key), keyring, context=item_context(item.id)
    )


def usable_items(session: Session) -> list[CanaryItem]:
    """Golden-set items the canary screens: negatives, and positives whose entry (if any) is
    still active (a disabled entry is not searchable), oldest first."""
    rows = session.execute(
        select(CanaryItem, Entry.disabled)
        .outerjoin(Entry, CanaryItem.entry_id == Entry.id)
        .order_by(CanaryItem.created_at, CanaryItem.id)
    ).all()
    return [item for item, disabled in rows if not disabled]


def prune_blobs(runtime: Runtime) -> int:
    """Delete the blob files whose row is gone (their entry was removed: the key went with the
    row, so they were already unreadable). Returns how many were deleted."""
    directory = golden_dir(runtime.settings.resolved_data_dir)
    if not directory.is_dir():
        return 0
    with runtime.sessions() as session:
        known = set(session.scalars(select(CanaryItem.blob_ref)))
    removed = 0
    for path in directory.glob("*.blob"):
        if path.name not in known:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass
class GoldenCollector:
    """Makes the golden set's copies and negatives at bank import (``__call__`` is the
    importer's ``on_images`` hook; :meth:`store` its ``after_commit``). Only PNG bytes are kept
    in memory until the commit; they are sealed as soon as the entries exist."""

    copies_per_image: int
    negatives_per_image: int
    backgrounds: list[Image.Image]
    copies: list[tuple[str, str, bytes]] = field(default_factory=list)  # (sha256, edit, png)
    negatives: list[tuple[str, bytes]] = field(default_factory=list)  # (edit, png)
    _seen: int = 0
    _background_pdq: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._background_pdq = [pdq_hash(photo).digest for photo in self.backgrounds]

    def _exclude_banked(self, image: Image.Image) -> None:
        """Drop the background photos that are (near) copies of ``image``, an image being
        banked: their edits would be copies, not negatives (PDQ within ThreatExchange's match
        distance, :data:`~moderation.matching.policy.PDQ_MATCH_DISTANCE`)."""
        digest = pdq_hash(image).digest
        keep = [
            i
            for i, other in enumerate(self._background_pdq)
            if hamming_distance(digest, other) > PDQ_MATCH_DISTANCE
        ]
        self.backgrounds = [self.backgrounds[i] for i in keep]
        self._background_pdq = [self._background_pdq[i] for i in keep]

    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> None:
        """Edit each of ``images`` (SHA-256 ``keys``) into its canary copies and negatives."""
        for image in images:
            self._exclude_banked(image)
        for image, key in zip(images, keys, strict=True):
            for j, edit in enumerate(canary_edits(self._seen, self.copies_per_image)):
                seed = canary_seed(key, edit, j)
                background = self._background(seed)
                if edit == "overlay_bg_60" and background is None:
                    continue
                self.copies.append(
                    (key, edit, png_bytes(training_copy(edit, image, seed, background)))
                )
            for j in range(self.negatives_per_image if self.backgrounds else 0):
                edit = canary_edits(self._seen + j + 1, 1)[0]
                seed = canary_seed(key, f"negative/{edit}", j)
                photo = self.backgrounds[seed % len(self.backgrounds)]
                other = self._background(seed + 1)
                self.negatives.append((edit, png_bytes(training_copy(edit, photo, seed, other))))
            self._seen += 1

    def _background(self, seed: int) -> Image.Image | None:
        return self.backgrounds[seed % len(self.backgrounds)] if self.backgrounds else None

    def store(self, runtime: Runtime, entry_of: dict[str, int], actor: str) -> int:
        """Seal the collected images as golden-set items (copies linked to the entries made
        from their source, ``entry_of``: SHA-256 -> entry id); one audit event. Returns the
        number stored."""
        data_dir = runtime.settings.resolved_data_dir
        with transaction(runtime.sessions) as session:
            banks = dict(
                session.execute(
                    select(Entry.id, Entry.bank_id).where(Entry.id.in_(set(entry_of.values())))
                ).all()
            )
            items: list[tuple[str, int | None, str, bytes]] = [
                ("match", entry_of[key], edit, data)
                for key, edit, data in self.copies
                if key in entry_of  # else a duplicate: no entry was made from it
            ]
            items += [("no-match", None, edit, data) for edit, data in self.negatives if entry_of]
            for label, entry_id, edit, data in items:
                add_item(
                    session,
                    runtime.keyring,
                    data_dir,
                    data,
                    origin="import",
                    label=label,
                    entry_id=entry_id,
                    bank_id=banks.get(entry_id) if entry_id is not None else None,
                    edit=edit,
                    added_by=actor,
                )
            stored = len(items)
            if stored:
                record_event(
                    session,
                    actor=actor,
                    action="canary.items_added",
                    details={"origin": "import", "items": stored},
                )
        self.copies.clear()
        self.negatives.clear()
        return stored


def golden_collector(runtime: Runtime) -> GoldenCollector | None:
    """The import's golden-set collector, or None when both counts are 0 in settings."""
    settings = runtime.settings
    if settings.canary_edits_per_entry == 0 and settings.canary_negatives_per_entry == 0:
        return None
    return GoldenCollector(
        settings.canary_edits_per_entry,
        settings.canary_negatives_per_entry,
        background_images(settings.classifier_background_dir),
    )


def with_golden(runtime: Runtime, hooks: ImportHooks, collector: GoldenCollector) -> ImportHooks:
    """``hooks`` extended with ``collector``: it sees each batch of images after ``hooks``'s own
    ``on_images``, and stores its items after ``hooks``'s ``after_commit`` (whose count of
    training pairs is returned)."""
    inner_images, inner_commit = hooks.on_images, hooks.after_commit

    def on_images(images: Sequence[Image.Image], keys: Sequence[str]) -> None:
        if inner_images is not None:
            inner_images(images, keys)
        collector(images, keys)

    def after_commit(entry_of: dict[str, int], actor: str) -> int:
        pairs = inner_commit(entry_of, actor) if inner_commit is not None else 0
        collector.store(runtime, entry_of, actor)
        return pairs

    return ImportHooks(
        region_embedder=hooks.region_embedder, on_images=on_images, after_commit=after_commit
    )
