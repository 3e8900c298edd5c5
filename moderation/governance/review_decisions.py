"""Settling a review item: confirm, not a match, or escalate.

:func:`decide` settles an item: ``confirm`` (the upload is blocked; optionally added to a block
bank), ``not_a_match`` (allowed; optionally proposed for an allow bank, which a second reviewer
or an admin must approve: :mod:`moderation.governance.allow_proposals`) or ``escalate`` (to an
admin's queue). Each final decision writes an audit event, asks the callback queue to tell the
platform, and writes one :class:`~moderation.storage.models.LabelledPair` per matched entry for
the classifier stage. Claiming items is :mod:`moderation.governance.review`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
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
from moderation.governance.approvals import ApprovalError, propose_allow
from moderation.governance.legal_holds import hold_confirmed
from moderation.governance.review import NotClaimedError, ReviewError, resolve_now
from moderation.matching.statements import current_statement, record_decision
from moderation.matching.video import is_video
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
    from moderation.matching.policy import Policy
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
    proposal_id: int | None = None  # the pending allow proposal (not_a_match with an allow bank)
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


def _bank_for(session: Session, bank_name: str, decision: str) -> Bank:
    """The bank ``decision`` may add to, by name.

    Raises:
        ReviewError: the decision adds to no bank, or to banks of another kind.
        moderation.banks.records.BlocklistError: unknown bank.
    """
    bank = get_bank(session, bank_name)
    wanted = BANK_KIND_FOR.get(decision)
    if wanted is None:
        raise ReviewError(f"{decision} cannot add the upload to a bank")
    if bank.kind != wanted:
        raise ReviewError(f"{decision} adds to {wanted} banks; {bank.name!r} is a {bank.kind} bank")
    return bank


def prepare_bank_entry(
    runtime: Runtime, upload_id: str, bank_name: str, decision: str
) -> _Prepared:
    """The upload's signals, computed outside any transaction with the serving encoder
    (:meth:`Runtime.follow_serving_encoder`: a promotion since this process started is
    followed), ready for :func:`add_entry`.

    Raises:
        ReviewError: wrong bank kind for ``decision``, no such upload, image gone (erased) or
            undecodable.
        moderation.banks.records.BlocklistError: unknown bank.
    """
    with runtime.sessions() as session:
        bank = _bank_for(session, bank_name, decision)
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
    if is_video(data):
        raise ReviewError("banks hold images: a video upload cannot be added to a bank")
    runtime.follow_serving_encoder()
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


@dataclass
class _Settled:
    """What a final decision did beyond the item: labelled pairs, the entry added, or the allow
    proposal filed, and the new entry's signals for the snapshot."""

    pairs: int = 0
    entry_id: str | None = None
    proposal_id: int | None = None
    signals: list[EntrySignals] = field(default_factory=list)


def _decision_details(
    item: ReviewItem,
    final: str | None,
    matches: Sequence[Match],
    bank: str | None,
    settled: _Settled,
) -> dict[str, Any]:
    """The ``review.decide`` audit event's details."""
    return {
        "upload_id": item.upload_id,
        "decision": item.decision,
        "final": final,
        "matches": [f"e_{m.entry_id}" for m in matches if m.entry_id is not None],
        "bank": bank,
        "entry_id": settled.entry_id,
        "allow_proposal": settled.proposal_id,
    }


def _settle(
    session: Session,
    item: ReviewItem,
    screening: Screening | None,
    *,
    reviewer_id: int,
    origin: str | None,
    prepared: _Prepared | None,
    allow_bank: str | None,
) -> _Settled:
    """A final decision's labelled pairs and bank change; ``allow_bank`` files a proposal
    instead of adding an entry."""
    decision = item.decision or ""
    matches = list(screening.matches) if screening is not None else []
    pairs = _add_labelled_pairs(
        session,
        item,
        screening,
        matches,
        is_copy=decision == "confirm",
        reviewer_id=reviewer_id,
    )
    if allow_bank is not None:
        try:
            proposal = propose_allow(
                session,
                bank=_bank_for(session, allow_bank, decision),
                upload_id=item.upload_id,
                review_item_id=item.id,
                requested_by=reviewer_id,
                origin=origin,
            )
        except ApprovalError as exc:
            raise ReviewError(str(exc)) from exc
        return _Settled(pairs, proposal_id=proposal.id)
    if prepared is not None and prepared.signals is not None:
        entry, signal = add_entry(session, prepared, actor=f"user:{reviewer_id}")
        if entry is not None and signal is not None:
            return _Settled(pairs, entry_id=entry.public_id, signals=[signal])
    return _Settled(pairs)


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
    policy: Policy | None = None,
    allow_bank: str | None = None,
) -> tuple[DecisionOutcome, list[EntrySignals]]:
    item = _claimed_item(session, item_id, reviewer_id, decision)
    screening = session.scalar(select(Screening).where(Screening.upload_id == item.upload_id))
    matches = list(screening.matches) if screening is not None else []
    item.decided_by, item.decided_at, item.decision = reviewer_id, now, decision
    if notes:
        item.notes = notes
    item.claimed_by, item.lease_until = None, None
    final = FINAL_DECISION.get(decision)
    settled = _Settled()
    if final is None:
        item.state = "escalated"
    else:
        item.state = "decided"
        if decision == "confirm" and policy is not None:  # the hold a block places (issue 14)
            hold_confirmed(session, item, policy, actor=f"user:{reviewer_id}", origin=origin)
        settled = _settle(
            session,
            item,
            screening,
            reviewer_id=reviewer_id,
            origin=origin,
            prepared=prepared,
            allow_bank=allow_bank,
        )
    session.flush()
    bank = prepared.bank if prepared is not None else allow_bank
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.decide",
        target=f"review_item:{item.id}",
        origin=origin,
        details=_decision_details(item, final, matches, bank, settled),
    )
    if final is not None:
        _announce(session, item, screening, final)
    outcome = DecisionOutcome(
        item_id=item.id,
        upload_id=item.upload_id,
        decision=decision,
        final=final,
        labelled_pairs=settled.pairs,
        entry_id=settled.entry_id,
        proposal_id=settled.proposal_id,
        notified=final is not None,
    )
    return outcome, settled.signals


def _announce(session: Session, item: ReviewItem, screening: Screening | None, final: str) -> None:
    """Record the final decision's statement of reasons and tell the platform (after commit)."""
    record_decision(
        session,
        item.upload_id,
        source="review",
        decision=final,
        screening=screening,
        decided_by=item.decided_by,
        reason=f"review_{item.decision}",
    )
    notify_decision(session, item.upload_id)


def add_entry(
    session: Session, prepared: _Prepared, *, actor: str
) -> tuple[Entry | None, EntrySignals | None]:
    """Add the prepared upload to its bank (audited ``entry.add_upload``): (entry, its signals
    for the next snapshot), or (None, None) when the bank already holds the upload's bytes."""
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


def _prepare_for_item(runtime: Runtime, item_id: int, bank_name: str, decision: str) -> _Prepared:
    """:func:`prepare_bank_entry` for review item ``item_id``'s upload (outside the decision's
    transaction: embedding takes a while).

    Raises:
        ReviewError: unknown item, or as :func:`prepare_bank_entry`.
    """
    with runtime.sessions() as session:
        item = session.get(ReviewItem, item_id)
        if item is None:
            raise ReviewError(f"no review item {item_id}")
        upload_id = item.upload_id
    return prepare_bank_entry(runtime, upload_id, bank_name, decision)


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

    ``confirm`` makes the upload's decision block (placing the legal hold an automatic block of
    its category places, :func:`moderation.governance.legal_holds.hold_confirmed`) and
    ``not_a_match`` allow; both write one
    labelled pair per matched entry (features from the screening's explanation) and call
    ``moderation.service.callbacks.notify_decision``. ``confirm`` with ``bank_name`` adds the
    image to that block bank (``Entry.upload_id`` set, so erasure follows it); ``not_a_match``
    with an allow bank only files an allow proposal (``DecisionOutcome.proposal_id``) that
    suppresses nothing until a second reviewer or an admin approves it. ``escalate`` moves the
    item to the admins' queue without a label.

    Raises:
        NotClaimedError: the reviewer does not hold the item.
        ReviewError: unknown item or decision, wrong bank kind, image gone or undecodable.
        moderation.banks.records.BlocklistError: unknown bank.
    """
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}")
    allow_bank = bank_name if bank_name and decision == "not_a_match" else None
    prepared = (
        _prepare_for_item(runtime, item_id, bank_name, decision)
        if bank_name and allow_bank is None
        else None
    )
    holder: dict[str, DecisionOutcome] = {}

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        outcome, signals = _apply_decision(
            session,
            item_id=item_id,
            reviewer_id=reviewer_id,
            decision=decision,
            notes=notes,
            origin=origin,
            now=resolve_now(now),
            prepared=prepared,
            policy=runtime.policy,
            allow_bank=allow_bank,
        )
        holder["outcome"] = outcome
        return signals, ()

    if prepared is None:
        with transaction(runtime.sessions) as session:
            change(session)
        return holder["outcome"]
    version = commit_with_snapshot(runtime, change, follow_encoder=False)
    return replace(holder["outcome"], snapshot_version=version)


def current_decision(session: Session, upload_id: str) -> str | None:
    """The upload's decision now: its newest statement of reasons (an appeal's, a reviewer's),
    else the reviewer's final one when settled, else the screening's."""
    statement = current_statement(session, upload_id)
    if statement is not None:
        return statement.decision
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
