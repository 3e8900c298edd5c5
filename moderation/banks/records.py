"""Banks and entries as database records: creating and finding banks, parsing entry ids, and
the entry metadata screening reports for a match (:class:`EntryInfo`).

Entry metadata lives in SQL; the entries' signals live only in the encrypted snapshot
(:mod:`moderation.banks.versions`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.sealed_fields import entry_labels
from moderation.crypto.keys import KeyRing
from moderation.storage.models import Bank, Entry


class BlocklistError(Exception):
    """A bank or entry operation was refused (unknown bank, bad kind, ...)."""


class UnknownBankError(BlocklistError):
    """No bank has the given name."""


@dataclass(frozen=True)
class EntryInfo:
    """What screening needs to know about a matched entry (no signals)."""

    entry_id: int
    bank_id: int
    bank_name: str
    bank_kind: str
    category: str
    label: str
    # Quarantined (flood control): its matches go to review, never block.
    quarantined: bool = False

    @property
    def public_id(self) -> str:
        """``e_<n>`` as shown in APIs."""
        return f"e_{self.entry_id}"


def create_bank(
    session: Session,
    name: str,
    *,
    kind: str = "block",
    category: str = "default",
    owner_client_id: int | None = None,
) -> Bank:
    """Create a bank: the deployment's (shared with every client) or, with
    ``owner_client_id``, that client's (private to it until shared;
    :mod:`moderation.banks.tenancy`).

    Raises:
        BlocklistError: bad kind, empty name, or the name is taken.
    """
    if kind not in ("block", "allow"):
        raise BlocklistError(f"bank kind must be 'block' or 'allow', not {kind!r}")
    if not name.strip():
        raise BlocklistError("bank name must not be empty")
    if session.scalar(select(Bank).where(Bank.name == name)) is not None:
        raise BlocklistError(f"bank {name!r} already exists")
    bank = Bank(
        name=name,
        kind=kind,
        category=category or "default",
        enabled=True,
        owner_client_id=owner_client_id,
        shared_with_all=owner_client_id is None,
    )
    session.add(bank)
    session.flush()
    return bank


def create_bank_audited(
    session: Session,
    name: str,
    *,
    kind: str,
    category: str,
    actor: str,
    origin: str | None = None,
    owner_client_id: int | None = None,
) -> Bank:
    """:func:`create_bank`, audited as ``bank.create`` (name, kind, category, owner client id).

    Raises:
        BlocklistError: as :func:`create_bank`.
    """
    bank = create_bank(session, name, kind=kind, category=category, owner_client_id=owner_client_id)
    record_event(
        session,
        actor=actor,
        action="bank.create",
        target=f"bank:{bank.id}",
        origin=origin,
        details={
            "name": bank.name,
            "kind": bank.kind,
            "category": bank.category,
            "owner_client_id": owner_client_id,
        },
    )
    return bank


def entries_page(
    session: Session, bank_id: int, *, page: int, per_page: int
) -> tuple[list[Entry], int]:
    """One page (1-based, ``per_page`` rows, by entry id) of a bank's entries, and how many
    entries the bank holds."""
    total = session.scalar(select(func.count()).where(Entry.bank_id == bank_id)) or 0
    entries = session.scalars(
        select(Entry)
        .where(Entry.bank_id == bank_id)
        .order_by(Entry.id)
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    return list(entries), total


def get_bank(session: Session, name: str) -> Bank:
    """The bank called ``name``.

    Raises:
        UnknownBankError: no such bank (a :class:`BlocklistError`).
    """
    bank = session.scalar(select(Bank).where(Bank.name == name))
    if bank is None:
        known = session.scalars(select(Bank.name).order_by(Bank.name)).all()
        raise UnknownBankError(f"no bank named {name!r} (banks: {list(known)})")
    return bank


def parse_entry_id(text_id: str | int) -> int:
    """Accept ``e_12``, ``12`` or 12.

    Raises:
        BlocklistError: anything else.
    """
    raw = str(text_id).strip()
    raw = raw[2:] if raw.startswith("e_") else raw
    if not raw.isdigit():
        raise BlocklistError(f"not an entry id: {text_id!r} (expected e_<number>)")
    return int(raw)


def entry_infos(
    session: Session, entry_ids: Iterable[int], keyring: KeyRing | None = None
) -> dict[int, EntryInfo]:
    """Metadata for the given entry ids (missing ids are left out); labels are decrypted with
    ``keyring`` (:func:`moderation.banks.sealed_fields.entry_labels`), else empty."""
    wanted = list(entry_ids)
    labels = entry_labels(session, keyring, wanted) if keyring is not None else {}
    infos: dict[int, EntryInfo] = {}
    for start in range(0, len(wanted), 10_000):
        chunk = wanted[start : start + 10_000]
        rows = session.execute(
            select(
                Entry.id,
                Entry.bank_id,
                Bank.name,
                Bank.kind,
                Bank.category,
                Entry.quarantined_at,
            )
            .join(Bank, Entry.bank_id == Bank.id)
            .where(Entry.id.in_(chunk))
        ).all()
        for eid, bank_id, bank_name, kind, category, quarantined_at in rows:
            label = labels.get(eid, "")
            infos[eid] = EntryInfo(
                eid, bank_id, bank_name, kind, category, label, quarantined_at is not None
            )
    return infos
