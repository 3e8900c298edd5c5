"""The review queue: uncertain screenings settled by people, one reviewer per item at a time.

Items come from :func:`moderation.matching.screening.record_result` (decision ``review``, or
``unscannable`` routed to review). The queue is ordered by policy priority (higher first) then
age (oldest first). :func:`claim_next` takes a lease on the next item so two reviewers never work
on the same one (ROOST Coop's "no two moderators on one job"): ``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL, an atomic conditional ``UPDATE`` on SQLite (whose transactions begin
IMMEDIATE, see :mod:`moderation.storage.db`). A lease that runs out returns the item to the queue.

:func:`decide` settles an item: ``confirm`` (the upload is blocked; optionally added to a block
bank), ``not_a_match`` (allowed; optionally added to an allow bank) or ``escalate`` (to an
admin's queue). Each final decision writes an audit event, asks the callback queue to tell the
platform, and writes one :class:`~moderation.storage.models.LabelledPair` per matched entry for
the classifier stage. Reviewer wellness: a per-reviewer daily exposure counter with a limit, and
images shown blurred and greyscale until revealed (each reveal audited).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.importer import compute_signals
from moderation.banks.operations import commit_with_snapshot
from moderation.banks.records import get_bank
from moderation.banks.snapshot_payload import EntrySignals
from moderation.media.decode import UnscannableImage, decode_image
from moderation.service.callbacks import notify_decision
from moderation.service.uploads import BlobMissingError, read_upload
from moderation.storage.db import transaction
from moderation.storage.models import (
    Bank,
    Entry,
    LabelledPair,
    ReviewerExposure,
    ReviewItem,
    Screening,
    Upload,
    User,
)

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

QUEUES: dict[str, tuple[str, ...]] = {"main": ("open", "claimed"), "escalated": ("escalated",)}
"""Queue name -> item states it serves. The escalated queue is worked by admins."""
DECISIONS: tuple[str, ...] = ("confirm", "not_a_match", "escalate")
FINAL_DECISION: dict[str, str] = {"confirm": "block", "not_a_match": "allow"}
"""What a reviewer's decision makes of the upload."""
BANK_KIND_FOR: dict[str, str] = {"confirm": "block", "not_a_match": "allow"}
"""The bank kind an upload may be added to with each decision."""

PREVIEW_PX = 96
"""Longest side of the pre-reveal preview: too small to show detail even before CSS blur."""
FULL_PX = 1024
"""Longest side of the revealed image (enough to judge a match; smaller than most originals)."""
EXIF_TEXT_TAGS: tuple[str, ...] = (
    "ImageDescription",
    "Make",
    "Model",
    "Software",
    "DateTime",
    "Artist",
    "Copyright",
)


class ReviewError(Exception):
    """A review operation was refused (unknown item, bad decision, wrong bank kind...)."""


class NotClaimedError(ReviewError):
    """The item is not claimed by this reviewer (the lease ran out and someone took it)."""


class ExposureLimitReached(ReviewError):
    """The reviewer has been shown the daily limit of items: no more claims today."""


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite returns naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


# --- exposure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """A reviewer's counts for one UTC day and the daily item limit."""

    day: str
    items: int
    reveals: int
    limit: int

    @property
    def remaining(self) -> int:
        """Items the reviewer may still be shown today."""
        return max(0, self.limit - self.items)


def _day(now: datetime) -> str:
    return utc(now).strftime("%Y-%m-%d")


def exposure(
    session: Session, user_id: int, *, limit: int, now: datetime | None = None
) -> Exposure:
    """Today's (UTC) exposure counts of ``user_id``."""
    day = _day(_now(now))
    row = session.get(ReviewerExposure, (user_id, day))
    return Exposure(day, row.items if row else 0, row.reveals if row else 0, limit)


def _bump(
    session: Session, user_id: int, now: datetime, *, items: int = 0, reveals: int = 0
) -> None:
    day = _day(now)
    row = session.get(ReviewerExposure, (user_id, day), with_for_update=True)
    if row is None:
        row = ReviewerExposure(user_id=user_id, day=day, items=0, reveals=0)
        session.add(row)
    row.items += items
    row.reveals += reveals
    session.flush()


# --- claiming --------------------------------------------------------------------------------


def _claimable(states: Sequence[str], now: datetime, exclude: Iterable[int]) -> Any:
    condition = and_(
        ReviewItem.state.in_(states),
        or_(ReviewItem.lease_until.is_(None), ReviewItem.lease_until < now),
    )
    excluded = list(exclude)
    if excluded:
        condition = and_(condition, ReviewItem.id.not_in(excluded))
    return condition


def current_claim(
    session: Session, reviewer_id: int, *, queue: str = "main", now: datetime | None = None
) -> ReviewItem | None:
    """The item ``reviewer_id`` holds an unexpired lease on in ``queue``, if any."""
    return session.scalar(
        select(ReviewItem)
        .where(
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.state.in_(QUEUES[queue]),
            ReviewItem.lease_until >= _now(now),
        )
        .order_by(ReviewItem.lease_until.desc())
        .limit(1)
    )


def claim_next(
    session: Session,
    *,
    reviewer_id: int,
    lease_seconds: int,
    daily_limit: int,
    queue: str = "main",
    exclude: Iterable[int] = (),
    now: datetime | None = None,
) -> ReviewItem | None:
    """Lease the next item (priority, then age) to ``reviewer_id``; None when the queue is empty.

    A reviewer holds one item at a time: an unexpired claim of theirs (not in ``exclude``) is
    returned again with its lease renewed. A new claim counts towards the reviewer's daily
    exposure and is audited (``review.claim``).

    Raises:
        ExposureLimitReached: the reviewer was shown ``daily_limit`` items today.
        ReviewError: unknown queue, or the escalated queue for someone who is not an admin.
    """
    if queue not in QUEUES:
        raise ReviewError(f"unknown queue {queue!r}")
    moment = _now(now)
    lease_until = moment + timedelta(seconds=lease_seconds)
    excluded = set(exclude)
    held = current_claim(session, reviewer_id, queue=queue, now=moment)
    if held is not None and held.id not in excluded:
        held.lease_until = lease_until
        return held
    reviewer = session.get(User, reviewer_id)
    if reviewer is None or reviewer.disabled:
        raise ReviewError(f"no active user {reviewer_id}")
    if queue == "escalated" and reviewer.role != "admin":
        raise ReviewError("only admins work the escalated queue")
    if exposure(session, reviewer_id, limit=daily_limit, now=moment).remaining <= 0:
        raise ExposureLimitReached(f"daily limit of {daily_limit} review items reached")
    states = QUEUES[queue]
    claimed_state = "claimed" if queue == "main" else "escalated"
    order = (ReviewItem.priority.desc(), ReviewItem.created_at.asc(), ReviewItem.id.asc())
    item: ReviewItem | None = None
    if session.get_bind().dialect.name == "postgresql":
        # Rows another transaction is claiming are skipped rather than waited for.
        item = session.scalars(
            select(ReviewItem)
            .where(_claimable(states, moment, excluded))
            .order_by(*order)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if item is not None:
            item.state, item.claimed_by, item.lease_until = claimed_state, reviewer_id, lease_until
    else:
        # Compare-and-set: the UPDATE only wins while the row is still claimable.
        for _attempt in range(10):
            candidate = session.scalar(
                select(ReviewItem.id)
                .where(_claimable(states, moment, excluded))
                .order_by(*order)
                .limit(1)
            )
            if candidate is None:
                break
            won = session.execute(
                update(ReviewItem)
                .where(ReviewItem.id == candidate, _claimable(states, moment, ()))
                .values(state=claimed_state, claimed_by=reviewer_id, lease_until=lease_until)
                .execution_options(synchronize_session=False)
            )
            if won.rowcount == 1:  # type: ignore[attr-defined]
                item = session.get(ReviewItem, candidate, populate_existing=True)
                break
    if item is None:
        return None
    session.flush()
    _bump(session, reviewer_id, moment, items=1)
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.claim",
        target=f"review_item:{item.id}",
        details={"queue": queue, "lease_until": lease_until.isoformat()},
    )
    return item


def renew_lease(
    session: Session,
    item_id: int,
    reviewer_id: int,
    *,
    lease_seconds: int,
    now: datetime | None = None,
) -> bool:
    """Extend the lease of an item the reviewer holds; False when they no longer hold it."""
    moment = _now(now)
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.id == item_id,
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.state.in_(("claimed", "escalated")),
        )
        .values(lease_until=moment + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, item_id: int, reviewer_id: int) -> bool:
    """Give a claimed item back to its queue (a skip); audited. False when not held."""
    item = session.get(ReviewItem, item_id, with_for_update=True)
    if item is None or item.claimed_by != reviewer_id or item.state not in ("claimed", "escalated"):
        return False
    if item.state == "claimed":
        item.state = "open"
    item.claimed_by, item.lease_until = None, None
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.release",
        target=f"review_item:{item.id}",
    )
    return True


# --- decisions -------------------------------------------------------------------------------


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
    sha256: str | None
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
        prepared = _Prepared(bank=bank.name, upload_id=upload.id, sha256=upload.sha256)
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
    item = session.get(ReviewItem, item_id, with_for_update=True)
    if item is None:
        raise ReviewError(f"no review item {item_id}")
    if item.claimed_by != reviewer_id or item.state not in ("claimed", "escalated"):
        raise NotClaimedError(f"review item {item_id} is not claimed by you")
    if decision == "escalate" and item.state == "escalated":
        raise ReviewError("the item is already escalated: confirm it or mark it not a match")
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
        features = _candidate_features(screening) if screening is not None else {}
        for match in matches:
            if match.entry_id is None:
                continue
            session.add(
                LabelledPair(
                    upload_id=item.upload_id,
                    entry_id=match.entry_id,
                    is_copy=decision == "confirm",
                    source="review",
                    features=features.get(f"e_{match.entry_id}", {}),
                    created_by=reviewer_id,
                )
            )
            pairs += 1
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
        details={
            "upload_id": item.upload_id,
            "decision": decision,
            "final": final,
            "matches": [f"e_{m.entry_id}" for m in matches if m.entry_id is not None],
            "bank": prepared.bank if prepared else None,
            "entry_id": entry_id,
        },
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
    if prepared.sha256 is not None and session.scalar(
        select(Entry.id).where(Entry.bank_id == bank.id, Entry.source_sha256 == prepared.sha256)
    ):
        logger.info("upload %s is already in bank %s", prepared.upload_id, bank.name)
        return None, None
    vectors, pdqs, regions = prepared.signals
    entry = Entry(
        bank_id=bank.id,
        label=f"upload {prepared.upload_id}",
        source_ref=f"upload:{prepared.upload_id}",
        source_sha256=prepared.sha256,
        upload_id=prepared.upload_id,
        added_by=actor,
    )
    session.add(entry)
    session.flush()
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
    moment = _now(now)
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


def record_reveal(
    session: Session,
    item_id: int,
    reviewer_id: int,
    *,
    origin: str | None = None,
    now: datetime | None = None,
) -> None:
    """Count and audit (``review.reveal``) that a reviewer un-blurred an item's image."""
    _bump(session, reviewer_id, _now(now), reveals=1)
    record_event(
        session,
        actor=f"user:{reviewer_id}",
        action="review.reveal",
        target=f"review_item:{item_id}",
        origin=origin,
    )


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchView:
    """One matched entry as the reviewer sees it (the match explanation)."""

    entry_id: str | None
    label: str
    bank: str
    bank_kind: str
    cosine: float | None
    pdq_distance: int | None
    probability: float | None
    level: str | None
    signals: tuple[str, ...]


@dataclass(frozen=True)
class ItemView:
    """Everything the review page shows about one item (untrusted text is left unescaped here)."""

    item_id: int
    upload_id: str
    external_id: str | None
    received_at: datetime
    state: str
    priority: int
    category: str | None
    claimed_by: int | None
    lease_until: datetime | None
    decision: str | None
    decided_by: int | None
    decided_at: datetime | None
    notes: str | None
    screening_decision: str | None
    score: float | None
    reason: str | None
    policy: str | None
    index_version: int | None
    explanation: dict[str, Any] = field(default_factory=dict)
    matches: tuple[MatchView, ...] = ()


def item_view(session: Session, item_id: int) -> ItemView | None:
    """The review page's data for an item, or None."""
    item = session.get(ReviewItem, item_id)
    if item is None:
        return None
    upload = session.get(Upload, item.upload_id)
    screening = session.scalar(select(Screening).where(Screening.upload_id == item.upload_id))
    matches: list[MatchView] = []
    if screening is not None:
        for match in screening.matches:
            entry = session.get(Entry, match.entry_id) if match.entry_id is not None else None
            bank = session.get(Bank, match.bank_id) if match.bank_id is not None else None
            signals = match.signals or {}
            matches.append(
                MatchView(
                    entry_id=entry.public_id if entry else None,
                    label=entry.label if entry else "(entry deleted)",
                    bank=bank.name if bank else "(bank deleted)",
                    bank_kind=bank.kind if bank else "",
                    cosine=match.cosine,
                    pdq_distance=match.pdq_distance,
                    probability=match.probability,
                    level=signals.get("level"),
                    signals=tuple(str(s) for s in signals.get("agreed", [])),
                )
            )
    return ItemView(
        item_id=item.id,
        upload_id=item.upload_id,
        external_id=upload.external_id if upload else None,
        received_at=utc(upload.received_at) if upload else utc(item.created_at),
        state=item.state,
        priority=item.priority,
        category=item.category,
        claimed_by=item.claimed_by,
        lease_until=utc(item.lease_until) if item.lease_until else None,
        decision=item.decision,
        decided_by=item.decided_by,
        decided_at=utc(item.decided_at) if item.decided_at else None,
        notes=item.notes,
        screening_decision=screening.decision if screening else None,
        score=screening.score if screening else None,
        reason=screening.reason if screening else None,
        policy=screening.policy if screening else None,
        index_version=screening.index_version if screening else None,
        explanation=dict(screening.explanation or {}) if screening else {},
        matches=tuple(matches),
    )


def previous_item(
    session: Session, reviewer_id: int, *, before: datetime | None = None
) -> int | None:
    """The item the reviewer decided most recently (before ``before`` when given)."""
    query = select(ReviewItem.id).where(
        ReviewItem.decided_by == reviewer_id, ReviewItem.decided_at.is_not(None)
    )
    if before is not None:
        query = query.where(ReviewItem.decided_at < before)
    return session.scalar(query.order_by(ReviewItem.decided_at.desc()).limit(1))


@dataclass(frozen=True)
class QueueStats:
    """Queue depth by state and the age of the oldest waiting item, seconds."""

    open: int
    claimed: int
    escalated: int
    oldest_age_s: float | None

    @property
    def depth(self) -> int:
        """Items not yet settled."""
        return self.open + self.claimed + self.escalated


def queue_stats(session: Session, *, now: datetime | None = None) -> QueueStats:
    """Depth and oldest waiting item of the review queue."""
    moment = _now(now)
    counts = dict(
        session.execute(
            select(ReviewItem.state, func.count())
            .where(ReviewItem.state.in_(("open", "claimed", "escalated")))
            .group_by(ReviewItem.state)
        ).all()
    )
    oldest = session.scalar(
        select(func.min(ReviewItem.created_at)).where(
            ReviewItem.state.in_(("open", "claimed", "escalated"))
        )
    )
    return QueueStats(
        open=int(counts.get("open", 0)),
        claimed=int(counts.get("claimed", 0)),
        escalated=int(counts.get("escalated", 0)),
        oldest_age_s=(moment - utc(oldest)).total_seconds() if oldest is not None else None,
    )


# --- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadImage:
    """An upload re-encoded for display: JPEG bytes and size (px)."""

    jpeg: bytes
    width: int
    height: int


def _exif_text(data: bytes) -> dict[str, str]:
    names = {v: k for k, v in ExifTags.TAGS.items()}
    found: dict[str, str] = {}
    try:
        with Image.open(io.BytesIO(data)) as img:
            exif = img.getexif()
    except Exception:  # metadata is best effort; decode_image judged the pixels
        return found
    for tag in EXIF_TEXT_TAGS:
        value = exif.get(names[tag])
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        found[tag] = str(value)[:500]
    return found


def _upload_bytes(runtime: Runtime, upload_id: str) -> bytes | None:
    with runtime.sessions() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            return None
        try:
            return read_upload(
                upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
            )
        except BlobMissingError:
            return None


def render_upload(runtime: Runtime, upload_id: str, *, preview: bool) -> UploadImage | None:
    """The upload's first frame as a JPEG: a small greyscale preview, or the revealed image.

    The original bytes never reach the browser: the image is decoded safely
    (:func:`moderation.media.decode.decode_image`, with the configured limits) and re-encoded, so
    unusual formats or payloads riding in the file cannot reach it. The preview is at most
    :data:`PREVIEW_PX` px on its longest side, the revealed image :data:`FULL_PX`.
    Returns None when the blob is gone (erased) or does not decode.
    """
    data = _upload_bytes(runtime, upload_id)
    if data is None:
        return None
    try:
        decoded = decode_image(data, runtime.limits)
    except UnscannableImage:
        return None
    frame = decoded.frames[0]
    if preview:
        frame = frame.convert("L")
        frame.thumbnail((PREVIEW_PX, PREVIEW_PX))
    else:
        frame = frame.copy()
        frame.thumbnail((FULL_PX, FULL_PX))
    out = io.BytesIO()
    frame.save(out, format="JPEG", quality=85)
    return UploadImage(out.getvalue(), frame.width, frame.height)


def upload_exif(runtime: Runtime, upload_id: str) -> dict[str, str]:
    """Text EXIF tags of the upload (:data:`EXIF_TEXT_TAGS`): untrusted, escape when shown."""
    data = _upload_bytes(runtime, upload_id)
    return _exif_text(data) if data is not None else {}


def banks_for_decisions(session: Session) -> dict[str, list[str]]:
    """Enabled bank names by the decision that may add to them (confirm: block, allow)."""
    rows = session.execute(
        select(Bank.name, Bank.kind).where(Bank.enabled.is_(True)).order_by(Bank.name)
    ).all()
    return {
        decision: [name for name, kind in rows if kind == wanted]
        for decision, wanted in BANK_KIND_FOR.items()
    }
