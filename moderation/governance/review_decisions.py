"""Settling a review item: confirm, not a match, or escalate.

:func:`decide` settles an item: ``confirm`` (the upload is blocked; optionally added to a block
bank), ``not_a_match`` (allowed; optionally added to an allow bank) or ``escalate`` (to an
admin's queue). Each final decision writes an audit event, asks the callback queue to tell the
platform, and writes one :class:`~moderation.storage.models.LabelledPair` per matched entry for
the classifier stage. Claiming items is :mod:`moderation.governance.review`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.importer import compute_signals
from moderation.banks.operations import commit_with_snapshot
from moderation.banks.records import get_bank
from moderation.banks.sealed_fields import new_entry
from moderation.banks.snapshot_payload import EntrySignals
from moderation.crypto.keys import KeyRing
from moderation.governance.review import NotClaimedError, ReviewError, resolve_now
from moderation.media.decode import UnscannableImage, decode_image
from moderation.service.callbacks import notify_decision
from moderation.service.uploads import BlobMissingError, read_upload
from moderation.storage.db import transaction
from moderation.storage.models import (
    Bank,
    Entry,
    LabelledPair,
    Match,
    ReviewItem,
    Screening,
    Upload,
)

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

DECISIONS: tuple[str, ...] = ("confirm", "not_a_match", "escalate")
FINAL_DECISION: dict[str, str] = {"confirm": "block", "not_a_match": "allow"}
"""What a reviewer's decision makes of the upload."""
BANK_KIND_FOR: dict[str, str] = {"confirm": "block", "not_a_match": "allow"}
"""The bank kind an upload may be added to with each decision."""


@dataclass(frozen=True)
class DecisionOutcome:
    """What a decision did."""

    item_id: int
    upload_id: str
    decision: str
    final: str | None  # block | allow | None (escalated)
    labelled_pairs: int
    entry_id: str | None = None  # the entry made from the upload, when added to a bank
    snapshot_version: int | None = None
    notified: bool = False  # the callback queue was told (final decisions; a no-op without URL)


@dataclass
class _Prepared:
    bank: str
    upload_id: str
    content_hmac: str | None
    keyring: KeyRing
    signals: tuple[Any, list[tuple[bytes, int]], list[Any]] | None = None


def _candidate_features(screening: Screening) -> dict[str, dict[str, Any]]:
    features: dict[str, dict[str, Any]] = {}
    for cand in (screening.explanation or {}).get("candidates", []) or []:
        if isinstance(cand, dict) and isinstance(cand.get("entry_id"), str):
            value = cand.get("features")
            features[cand["entry_id"]] = dict(value) if isinstance(value, dict) else {}
    return features


def _prepare_bank_entry(
    runtime: Runtime, upload_id: str, bank_name: str, decision: str
) -> _Prepared:
    with runtime.sessions() as session:
        bank = get_bank(session, bank_name)
        wanted = BANK_KIND_FOR.get(decision)
        if wanted is None:
            raise ReviewError(f"{decision} cannot add the upload to a bank")
        if bank.kind != wanted:
            raise ReviewError(
                f"{decision} adds to {wanted} banks; {bank.name!r} is a {bank.kind} bank"
            )
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise ReviewError(f"no upload {upload_id}")
        try:
            data = read_upload(
                upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
            )
        except BlobMissingError as exc:
            raise ReviewError(
                "the upload's image is gone (erased?): cannot add it to a bank"
            ) from exc
        prepared = _Prepared(
            bank=bank.name,
            upload_id=upload.id,
            content_hmac=upload.content_hmac,
            keyring=runtime.keyring,
        )
    try:
        decoded = decode_image(data, runtime.limits)
    except UnscannableImage as exc:
        raise ReviewError(
            f"the upload cannot be decoded ({exc.reason}): cannot add it to a bank"
        ) from exc
    region_embedder = None
    if runtime.settings.classifier:
        from moderation.matching.classifier.regions import make_region_embedder

        region_embedder = make_region_embedder(runtime.encoder, batch_size=8)
    prepared.signals = compute_signals(
        [decoded.frames[0]], runtime.encoder, batch_size=1, region_embedder=region_embedder
    )
    return prepared


def _claimed_item(session: Session, item_id: int, reviewer_id: int, decision: str) -> ReviewItem:
    """The item, locked, once checked that ``reviewer_id`` holds it and may make ``decision``."""
    item = session.get(ReviewItem, item_id, with_for_update=True)
    if item is None:
        raise ReviewError(f"no review item {item_id}")
    if item.claimed_by != reviewer_id or item.state not in ("claimed", "escalated"):
        raise NotClaimedError(f"review item {item_id} is not claimed by you")
    if decision == "escalate" and item.state == "escalated":
        raise ReviewError("the item is already escalated: confirm it or mark it not a match")
    return item


def _add_labelled_pairs(
    session: Session,
    item: ReviewItem,
    screening: Screening | None,
    matches: Sequence[Match],
    *,
    is_copy: bool,
    reviewer_id: int,
) -> int:
    """One labelled pair per matched entry still in a bank; how many were added."""
    features = _candidate_features(screening) if screening is not None else {}
    pairs = 0
    for match in matches:
        if match.entry_id is None:
            continue
        session.add(
            LabelledPair(
                upload_id=item.upload_id,
                entry_id=match.entry_id,
                is_copy=is_copy,
                source="review",
                features=features.get(f"e_{match.entry_id}", {}),
                created_by=reviewer_id,
            )
        )
        pairs += 1
    return pairs


def _decision_details(
    item: ReviewItem,
    final: str | None,
    matches: Sequence[Match],
    prepared: _Prepared | None,
    entry_id: str | None,
) -> dict[str, Any]:
    """The ``review.decide`` audit event's details."""
    return {
        "upload_id": item.upload_id,
        "decision": item.decision,
        "final": final,
        "matches": [f"e_{m.entry_id}" for m in matches if m.entry_id is not None],
        "bank": prepared.bank if prepared else None,
        "entry_id": entry_id,
    }


def _apply_decision(
    session: Session,
    *,
    item_id: int,
    reviewer_id: int,
    decision: str,
    notes: str | None,
    origin: str | None,
    now: datetime,
    prepared: _Prepared | None,
) -> tuple[DecisionOutcome, list[EntrySignals]]:
    item = _claimed_item(session, item_id, reviewer_id, decision)
    screening = session.scalar(select(Screening).where(Screening.upload_id == item.upload_id))
    matches = list(screening.matches) if screening is not None else []
    item.decided_by, item.decided_at, item.decision = reviewer_id, now, decision
    if notes:
        item.notes = notes
    item.claimed_by, item.lease_until = None, None
    final = FINAL_DECISION.get(decision)
    pairs = 0
    signals: list[EntrySignals] = []
    entry_id: str | None = None
    if final is None:
        item.state = "escalated"
    else:
        item.state = "decided"
        pairs = _add_labelled_pairs(
            session,
            item,
            screening,
            matches,
            is_copy=decision == "confirm",
            reviewer_id=reviewer_id,
        )
        if prepared is not None and prepared.signals is not None:
            entry, signal = _add_entry(session, prepared, actor=f"user:{reviewer_id}")
            if entry is not None and signal is not None:
                entry_id, signals = entry.public_id, [signal]
    session.flush()
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.decide",
        target=f"review_item:{item.id}",
        origin=origin,
        details=_decision_details(item, final, matches, prepared, entry_id),
    )
    if final is not None:
        # The platform hears about the decision after this transaction commits.
        notify_decision(session, item.upload_id)
    outcome = DecisionOutcome(
        item_id=item.id,
        upload_id=item.upload_id,
        decision=decision,
        final=final,
        labelled_pairs=pairs,
        entry_id=entry_id,
        notified=final is not None,
    )
    return outcome, signals


def _add_entry(
    session: Session, prepared: _Prepared, *, actor: str
) -> tuple[Entry | None, EntrySignals | None]:
    assert prepared.signals is not None
    bank = get_bank(session, prepared.bank)
    known = prepared.content_hmac
    if known is not None and session.scalar(
        select(Entry.id).where(Entry.bank_id == bank.id, Entry.source_hmac == known)
    ):
        logger.info("upload %s is already in bank %s", prepared.upload_id, bank.name)
        return None, None
    vectors, pdqs, regions = prepared.signals
    upload_id = prepared.upload_id
    entry = new_entry(
        session,
        prepared.keyring,
        bank_id=bank.id,
        label=f"upload {upload_id}",
        source_ref=f"upload:{upload_id}",
        source_hmac=known,
        upload_id=upload_id,
        added_by=actor,
    )
    digest, quality = pdqs[0]
    record_event(
        session,
        actor=actor,
        action="entry.add_upload",
        target=f"entry:{entry.public_id}",
        details={"bank_id": bank.id, "upload_id": prepared.upload_id},
    )
    return entry, EntrySignals(entry.id, vectors[0], digest, quality, regions[0])


def decide(
    runtime: Runtime,
    item_id: int,
    *,
    reviewer_id: int,
    decision: str,
    bank_name: str | None = None,
    notes: str | None = None,
    origin: str | None = None,
    now: datetime | None = None,
) -> DecisionOutcome:
    """Settle a claimed item, in one transaction (with a new snapshot when a bank changes).

    ``confirm`` makes the upload's decision block and ``not_a_match`` allow; both write one
    labelled pair per matched entry (features from the screening's explanation) and call
    ``moderation.service.callbacks.notify_decision``. ``bank_name`` adds the upload's image to that
    bank
    (block bank for confirm, allow bank for not_a_match) with ``Entry.upload_id`` set, so erasure
    follows it. ``escalate`` moves the item to the admins' queue without a label.

    Raises:
        NotClaimedError: the reviewer does not hold the item.
        ReviewError: unknown item or decision, wrong bank kind, image gone or undecodable.
        moderation.banks.records.BlocklistError: unknown bank.
    """
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}")
    moment = resolve_now(now)
    prepared: _Prepared | None = None
    if bank_name:
        with runtime.sessions() as session:
            item = session.get(ReviewItem, item_id)
            if item is None:
                raise ReviewError(f"no review item {item_id}")
            upload_id = item.upload_id
        prepared = _prepare_bank_entry(runtime, upload_id, bank_name, decision)
    holder: dict[str, DecisionOutcome] = {}

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        outcome, signals = _apply_decision(
            session,
            item_id=item_id,
            reviewer_id=reviewer_id,
            decision=decision,
            notes=notes,
            origin=origin,
            now=moment,
            prepared=prepared,
        )
        holder["outcome"] = outcome
        return signals, ()

    if prepared is None:
        with transaction(runtime.sessions) as session:
            change(session)
        return holder["outcome"]
    version = commit_with_snapshot(runtime, change)
    return replace(holder["outcome"], snapshot_version=version)


def current_decision(session: Session, upload_id: str) -> str | None:
    """The upload's decision now: the reviewer's final one when settled, else the screening's."""
    item = session.scalar(select(ReviewItem).where(ReviewItem.upload_id == upload_id))
    if item is not None and item.state == "decided" and item.decision in FINAL_DECISION:
        return FINAL_DECISION[item.decision]
    return session.scalar(select(Screening.decision).where(Screening.upload_id == upload_id))


def banks_for_decisions(session: Session) -> dict[str, list[str]]:
    """Enabled bank names by the decision that may add to them (confirm: block, allow)."""
    rows = session.execute(
        select(Bank.name, Bank.kind).where(Bank.enabled.is_(True)).order_by(Bank.name)
    ).all()
    return {
        decision: [name for name, kind in rows if kind == wanted]
        for decision, wanted in BANK_KIND_FOR.items()
    }
