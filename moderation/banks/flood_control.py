"""Noisy-entry quarantine (flood control): daily match counts, the threshold check, admin actions.

An entry that matches a common meme floods the review queue (or blocks harmless posts).
:func:`moderation.banks.match_counts.count_matches` adds one per entry to ``entry_match_counts``
for every screening that matched it, in the screening's transaction. :func:`check_flood` (Celery
beat, every few minutes) quarantines each active entry of an enabled block bank whose count
today (UTC day) reaches

    ``max(min_matches, bank_median_multiple x median)`` or ``max_matches_per_day``

where ``median`` is the median of today's counts over the bank's active entries (an entry not
matched today counts 0; the policy's ``flood_control`` section gives the figures). A quarantined
entry (``entries.quarantined_at`` set) still matches, but its matches only ever send to review,
never block (:func:`moderation.matching.decision.match_level`). An admin then either confirms it
(:func:`confirm_entry`: it matches normally again, and flood control leaves it alone for the
rest of that UTC day; if it still floods the next day it is quarantined again) or releases it
(:func:`release_entry`: it is disabled). Each change is one transaction with its audit event and
a new snapshot version, so every worker reloads the entries' quarantine flags.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.match_counts import utc_today
from moderation.banks.operations import commit_with_snapshot
from moderation.banks.records import BlocklistError, parse_entry_id
from moderation.banks.sealed_fields import entry_labels
from moderation.banks.snapshot_payload import EntrySignals
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Bank, Entry, EntryMatchCount

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FloodLimits:
    """The policy's ``flood_control`` figures
    (:class:`moderation.matching.policy.FloodControlRules`)."""

    max_matches_per_day: int
    bank_median_multiple: float
    min_matches: int


@dataclass(frozen=True)
class FloodFigures:
    """Why one entry is over the threshold: its count today and the bank's figures."""

    entry_id: str
    bank: str
    day: str
    matches: int
    bank_median: float
    threshold: int

    def reason(self) -> str:
        """The ``entries.quarantine_reason`` text."""
        return (
            f"{self.matches} matches on {self.day} >= {self.threshold} "
            f"(bank {self.bank} median {self.bank_median:g})"
        )


def _median(sorted_counts: Sequence[int], size: int) -> float:
    """Median of ``size`` values: ``size - len(sorted_counts)`` zeros, then ``sorted_counts``."""
    if size <= 0:
        return 0.0
    zeros = size - len(sorted_counts)

    def at(i: int) -> int:
        return 0 if i < zeros else sorted_counts[i - zeros]

    mid = size // 2
    return float(at(mid)) if size % 2 else (at(mid - 1) + at(mid)) / 2


def find_flooding(session: Session, limits: FloodLimits, *, day: date) -> list[FloodFigures]:
    """Active, unquarantined entries of enabled block banks over the threshold on ``day``.

    Entries confirmed by an admin on ``day`` (``quarantine_confirmed_on``) are left out.
    Sorted by entry id.
    """
    counted = session.execute(
        select(Entry.id, Entry.bank_id, EntryMatchCount.matches)
        .join(Entry, Entry.id == EntryMatchCount.entry_id)
        .where(EntryMatchCount.day == day, Entry.disabled.is_(False))
    ).all()
    if not counted:
        return []
    by_bank: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for eid, bank_id, matches in counted:
        by_bank[bank_id].append((eid, matches))
    banks = {
        b.id: b
        for b in session.scalars(
            select(Bank).where(Bank.id.in_(by_bank), Bank.kind == "block", Bank.enabled.is_(True))
        )
    }
    sizes = dict(
        session.execute(
            select(Entry.bank_id, func.count())
            .where(Entry.bank_id.in_(banks), Entry.disabled.is_(False))
            .group_by(Entry.bank_id)
        ).all()
    )
    candidates: dict[int, FloodFigures] = {}
    for bank_id, bank in banks.items():
        counts = by_bank[bank_id]
        median = _median(sorted(m for _, m in counts), int(sizes.get(bank_id, 0)))
        threshold = min(
            limits.max_matches_per_day,
            max(limits.min_matches, math.ceil(limits.bank_median_multiple * median)),
        )
        for eid, matches in counts:
            if matches >= threshold:
                candidates[eid] = FloodFigures(
                    f"e_{eid}", bank.name, day.isoformat(), matches, median, threshold
                )
    if not candidates:
        return []
    eligible = session.scalars(
        select(Entry.id).where(
            Entry.id.in_(candidates),
            Entry.quarantined_at.is_(None),
            (Entry.quarantine_confirmed_on.is_(None)) | (Entry.quarantine_confirmed_on != day),
        )
    )
    return [candidates[eid] for eid in sorted(eligible)]


def check_flood(runtime: Runtime, *, actor: str, now: datetime | None = None) -> list[FloodFigures]:
    """Quarantine every entry over the policy's flood threshold today; return their figures.

    One transaction: each entry's ``quarantined_at`` and ``quarantine_reason``, one
    ``entry.quarantine`` audit event per entry (details: the figures), and a new snapshot
    version so every worker reloads. Nothing is written (no snapshot) when no entry is over the
    threshold or the policy's ``flood_control.enabled`` is false.
    """
    rules = runtime.policy.flood_control
    if not rules.enabled:
        return []
    limits = FloodLimits(rules.max_matches_per_day, rules.bank_median_multiple, rules.min_matches)
    moment = now or datetime.now(UTC)
    day = utc_today(moment)
    with runtime.sessions() as session:
        if not find_flooding(session, limits, day=day):
            return []
    found: list[FloodFigures] = []

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        found[:] = find_flooding(session, limits, day=day)
        for figures in found:
            entry = session.get(Entry, parse_entry_id(figures.entry_id))
            assert entry is not None
            entry.quarantined_at = moment
            entry.quarantine_reason = figures.reason()
            record_event(
                session,
                actor=actor,
                action="entry.quarantine",
                target=f"entry:{figures.entry_id}",
                details=asdict(figures),
            )
        return (), ()

    commit_with_snapshot(runtime, change)
    for figures in found:
        logger.warning("flood control quarantined %s: %s", figures.entry_id, figures.reason())
    return found


def list_quarantined(
    session: Session, keyring: KeyRing, *, bank_id: int | None = None
) -> list[dict[str, Any]]:
    """Quarantined entries (optionally of one bank), oldest quarantine first, with the reason
    and today's count."""
    today = utc_today()
    rows = session.execute(
        select(Entry, Bank.name, EntryMatchCount.matches)
        .join(Bank, Entry.bank_id == Bank.id)
        .outerjoin(
            EntryMatchCount,
            (EntryMatchCount.entry_id == Entry.id) & (EntryMatchCount.day == today),
        )
        .where(Entry.quarantined_at.is_not(None), *([Entry.bank_id == bank_id] if bank_id else []))
        .order_by(Entry.quarantined_at, Entry.id)
    ).all()
    labels = entry_labels(session, keyring, [entry.id for entry, _, _ in rows])
    return [
        {
            "entry_id": entry.public_id,
            "id": entry.id,
            "bank": bank_name,
            "label": labels.get(entry.id, ""),
            "quarantined_at": entry.quarantined_at.isoformat() if entry.quarantined_at else None,
            "reason": entry.quarantine_reason,
            "matches_today": matches or 0,
        }
        for entry, bank_name, matches in rows
    ]


def count_quarantined(session: Session) -> int:
    """How many entries are quarantined, awaiting an admin's confirm or release."""
    return int(session.scalar(select(func.count()).where(Entry.quarantined_at.is_not(None))) or 0)


def confirm_entry(
    runtime: Runtime, entry_id: str, *, actor: str, origin: str | None = None
) -> dict[str, Any]:
    """Keep a quarantined entry matching normally: clear the quarantine and record the
    confirmation (``quarantine_confirmed_on`` = today, UTC), so flood control does not
    quarantine it again the same UTC day. Audit event ``entry.quarantine_confirm``.

    Raises:
        BlocklistError: no such entry, or it is not quarantined.
    """
    return _resolve(runtime, entry_id, actor=actor, origin=origin, release=False)


def release_entry(
    runtime: Runtime, entry_id: str, *, actor: str, origin: str | None = None
) -> dict[str, Any]:
    """Release a quarantined (noisy) entry from matching: the entry is *disabled* (its signals
    stay in the encrypted snapshot; ``bank enable-entry`` undoes it), not deleted, since
    deleting entries needs a second admin's approval. Audit event ``entry.quarantine_release``.

    Raises:
        BlocklistError: no such entry, or it is not quarantined.
    """
    return _resolve(runtime, entry_id, actor=actor, origin=origin, release=True)


def _resolve(
    runtime: Runtime, entry_id: str, *, actor: str, origin: str | None, release: bool
) -> dict[str, Any]:
    """Clear an entry's quarantine, disabling it (release) or confirming it; new snapshot."""
    eid = parse_entry_id(entry_id)
    today = utc_today()

    def change(session: Session) -> tuple[Sequence[EntrySignals], Iterable[int]]:
        entry = session.get(Entry, eid)
        if entry is None:
            raise BlocklistError(f"no entry e_{eid}")
        if entry.quarantined_at is None:
            raise BlocklistError(f"entry e_{eid} is not quarantined")
        reason = entry.quarantine_reason
        entry.quarantined_at = None
        entry.quarantine_reason = None
        if release:
            entry.disabled = True
        else:
            entry.quarantine_confirmed_on = today
        record_event(
            session,
            actor=actor,
            action="entry.quarantine_release" if release else "entry.quarantine_confirm",
            target=f"entry:e_{eid}",
            origin=origin,
            details={"bank_id": entry.bank_id, "reason": reason},
        )
        return (), ()

    version = commit_with_snapshot(runtime, change)
    return {
        "entry_id": f"e_{eid}",
        "outcome": "released" if release else "confirmed",
        "disabled": release,
        "snapshot_version": version,
    }
