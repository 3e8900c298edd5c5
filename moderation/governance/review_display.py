"""What the review pages show: an item with its match explanation, and its image.

:func:`item_view` gathers an item, its upload, screening and matches; :func:`item_access` says
who may work on or read it; :func:`queue_page` and :func:`item_page` return everything the queue
and item pages show; :func:`render_upload` re-encodes the upload for display (a small greyscale
preview until revealed) and :func:`upload_exif` extracts its untrusted text metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.sealed_fields import entry_labels
from moderation.crypto.keys import KeyRing
from moderation.governance.review import (
    Exposure,
    QueueStats,
    ReviewError,
    current_claim,
    exposure,
    queue_stats,
    renew_lease,
    reviewer_client,
    utc,
)
from moderation.governance.review_decisions import banks_for_decisions
from moderation.matching.explain import match_explanation, result_decided_by
from moderation.matching.video import is_video
from moderation.media.decode import UnscannableImage, decode_image
from moderation.media.video import decode_video
from moderation.service.uploads import BlobMissingError, read_upload
from moderation.storage.db import transaction
from moderation.storage.models import Bank, Entry, ReviewItem, Screening, Upload

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

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
    decided_by: str | None = None
    """The stage that decided this match (:data:`moderation.matching.explain.MATCH_STAGES`)."""
    evidence: dict[str, Any] = field(default_factory=dict)
    """Each signal's value, the threshold it passed and whether it agreed: the ``signals``
    object of :func:`moderation.matching.explain.match_explanation`, as the API shows it."""


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
    screening_decided_by: str | None = None
    """The stage that decided the screening
    (:func:`moderation.matching.explain.result_decided_by`)."""


def _match_views(
    session: Session, keyring: KeyRing, screening: Screening
) -> tuple[tuple[MatchView, ...], str | None]:
    """The screening's matches as the reviewer sees them (most severe first), and the stage
    that decided it: :mod:`moderation.matching.explain` over the stored rows, as the API."""
    rows = sorted(screening.matches, key=lambda m: m.id)
    labels = entry_labels(session, keyring, [m.entry_id for m in rows if m.entry_id is not None])
    views: list[MatchView] = []
    explained: list[dict[str, Any]] = []
    for match in rows:
        entry = session.get(Entry, match.entry_id) if match.entry_id is not None else None
        bank = session.get(Bank, match.bank_id) if match.bank_id is not None else None
        signals = match.signals or {}
        public = match_explanation(
            signals,
            cosine=match.cosine,
            pdq_distance=match.pdq_distance,
            probability=match.probability,
        )
        explained.append(public)
        views.append(
            MatchView(
                entry_id=entry.public_id if entry else None,
                label=labels.get(entry.id, "") if entry else "(entry deleted)",
                bank=bank.name if bank else "(bank deleted)",
                bank_kind=bank.kind if bank else "",
                cosine=match.cosine,
                pdq_distance=match.pdq_distance,
                probability=match.probability,
                level=public["level"],
                signals=tuple(str(s) for s in signals.get("agreed", [])),
                decided_by=public["decided_by"],
                evidence=public["signals"],
            )
        )
    return tuple(views), result_decided_by(screening.decision, screening.reason, explained)


def item_view(session: Session, item_id: int, keyring: KeyRing) -> ItemView | None:
    """The review page's data for an item (labels decrypted with ``keyring``), or None."""
    item = session.get(ReviewItem, item_id)
    if item is None:
        return None
    upload = session.get(Upload, item.upload_id)
    screening = session.scalar(select(Screening).where(Screening.upload_id == item.upload_id))
    matches, stage = _match_views(session, keyring, screening) if screening else ((), None)
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
        matches=matches,
        screening_decided_by=stage,
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


class ItemNotFound(ReviewError):
    """No review item has this id."""


class ItemAccessDenied(ReviewError):
    """The user may neither work on nor read this item."""


def item_access(view: ItemView, user_id: int, role: str) -> str | None:
    """What the user may do with the item: ``work``, ``read`` or None (nothing).

    ``work`` when the user holds the item's claim (state ``claimed`` or ``escalated``);
    ``read`` when they decided it, or when their role is ``admin``; None otherwise.
    """
    if view.claimed_by == user_id and view.state in ("claimed", "escalated"):
        return "work"
    if role == "admin" or (view.decided_by == user_id and view.decided_by is not None):
        return "read"
    return None


def load_item(runtime: Runtime, item_id: int, user_id: int, role: str) -> tuple[ItemView, str]:
    """The item's view and the user's access to it (:func:`item_access`, never None).

    Raises :class:`ItemNotFound` when there is no such item, :class:`ItemAccessDenied` when the
    user may neither work on nor read it.
    """
    with runtime.sessions() as session:
        view = item_view(session, item_id, runtime.keyring)
    if view is None:
        raise ItemNotFound(f"no review item {item_id}")
    access = item_access(view, user_id, role)
    if access is None:
        raise ItemAccessDenied(f"review item {item_id} is not yours to see")
    return view, access


# --- pages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuePage:
    """What the queue page shows to one reviewer."""

    stats: QueueStats
    mine: int | None
    """The item the reviewer holds (main queue first, then escalated when allowed), or None."""
    exposure: Exposure
    last: int | None
    """The item the reviewer decided most recently, or None."""


def queue_page(
    runtime: Runtime, reviewer_id: int, *, escalated: bool, client_id: int | None = None
) -> QueuePage:
    """The queue page's data; ``escalated``: the reviewer may work the escalated queue;
    ``client_id``: figures of that API client's items only (a reviewer scoped to a client
    always sees their client's, :func:`moderation.governance.review.reviewer_client`).

    Raises:
        ReviewError: a reviewer scoped to one client asked for another's figures.
    """
    with runtime.sessions() as session:
        stats = queue_stats(session, client_id=reviewer_client(session, reviewer_id, client_id))
        mine = current_claim(session, reviewer_id, queue="main") or (
            current_claim(session, reviewer_id, queue="escalated") if escalated else None
        )
        counts = exposure(session, reviewer_id, limit=runtime.settings.review_daily_exposure_limit)
        last = previous_item(session, reviewer_id)
    return QueuePage(stats=stats, mine=mine.id if mine else None, exposure=counts, last=last)


@dataclass(frozen=True)
class ItemPage:
    """What the item page shows: the item, the user's access, and what surrounds it."""

    view: ItemView
    access: str
    """``work`` or ``read`` (:func:`item_access`)."""
    exposure: Exposure
    banks: dict[str, list[str]]
    """Enabled bank names by the decision that may add to them
    (:func:`moderation.governance.review_decisions.banks_for_decisions`)."""
    previous: int | None
    """The item the user decided before this one, or None."""
    exif: dict[str, str]
    """Untrusted text EXIF tags (:func:`upload_exif`)."""


def item_page(runtime: Runtime, item_id: int, user_id: int, role: str) -> ItemPage:
    """The item page's data; renews the user's lease when they work on the item.

    Raises :class:`ItemNotFound` or :class:`ItemAccessDenied` as :func:`load_item` does.
    """
    view, access = load_item(runtime, item_id, user_id, role)
    settings = runtime.settings
    with transaction(runtime.sessions) as session:
        if access == "work":
            renew_lease(session, item_id, user_id, lease_seconds=settings.review_lease_seconds)
        counts = exposure(session, user_id, limit=settings.review_daily_exposure_limit)
        banks = banks_for_decisions(session)
        previous = previous_item(session, user_id, before=view.decided_at)
    return ItemPage(
        view=view,
        access=access,
        exposure=counts,
        banks=banks,
        previous=previous,
        exif=upload_exif(runtime, view.upload_id),
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


def _shown_frame(runtime: Runtime, upload_id: str, data: bytes) -> Image.Image:
    """The frame a reviewer sees: an image's first frame; a video's matched frame (the
    screening explanation's ``video.matched_frame``), else its first screened frame.

    Raises:
        UnscannableImage: the upload does not decode within the configured limits.
    """
    if not is_video(data):
        return decode_image(data, runtime.limits).frames[0]
    video = decode_video(data, runtime.video_limits)
    with runtime.sessions() as session:
        explanation = session.scalar(
            select(Screening.explanation).where(Screening.upload_id == upload_id)
        )
    matched = ((explanation or {}).get("video") or {}).get("matched_frame") or {}
    number = matched.get("frame")
    at = video.frame_indices.index(number) if number in video.frame_indices else 0
    return video.frames[at]


def render_upload(runtime: Runtime, upload_id: str, *, preview: bool) -> UploadImage | None:
    """The upload's first frame (a video's matched frame) as a JPEG: a small greyscale
    preview, or the revealed image.

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
        frame = _shown_frame(runtime, upload_id, data)
    except UnscannableImage:
        return None
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
