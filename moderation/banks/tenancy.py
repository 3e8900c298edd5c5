"""Which banks apply to which API client (tenant isolation, issue 14).

A bank has an optional owner (an API client; None: the deployment's own bank) and a sharing
relation: ``shared_with_all`` or one ``bank_shares`` row per client. A bank *applies to* a
client when the client owns it, it is shared with all, or it is shared with that client. Only
banks that apply to a client match that client's uploads, and only they are named (bank name,
entry id, entry label) in what the client is shown. Uploads without a client (CLI, console) are
the operator's: every bank applies. A deployment-wide bank is created shared with all; a
client-owned bank is created private to its owner. Every change is audited.
"""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.records import BlocklistError, UnknownBankError, get_bank
from moderation.storage.models import ApiClient, Bank
from moderation.storage.tenancy import BankShare


def applicable_bank_ids(session: Session, client_id: int | None) -> frozenset[int] | None:
    """The ids of the banks that apply to ``client_id``; None (every bank) without a client."""
    if client_id is None:
        return None
    shared = select(BankShare.bank_id).where(BankShare.client_id == client_id)
    rows = session.scalars(
        select(Bank.id).where(
            or_(
                Bank.owner_client_id == client_id,
                Bank.shared_with_all.is_(True),
                Bank.id.in_(shared),
            )
        )
    )
    return frozenset(rows)


def bank_applies(session: Session, bank: Bank, client_id: int | None) -> bool:
    """Whether ``bank`` applies to (matches for, and is named to) ``client_id``."""
    allowed = applicable_bank_ids(session, client_id)
    return allowed is None or bank.id in allowed


def applicable_bank_names(session: Session, client_id: int) -> frozenset[str]:
    """The names of the banks that apply to ``client_id``."""
    allowed = applicable_bank_ids(session, client_id) or frozenset()
    return frozenset(session.scalars(select(Bank.name).where(Bank.id.in_(allowed))))


def bank_for_client(session: Session, name: str, client_id: int, *, write: bool = False) -> Bank:
    """The bank ``name`` as ``client_id`` may use it; ``write``: to add entries, which only
    its owner may do (or any client it applies to, for a deployment bank).

    Raises:
        UnknownBankError: no such bank, or one that does not apply to the client (the same
            error and message: another tenant's bank is indistinguishable from a missing one).
        BlocklistError: ``write`` to a bank another client owns and shares.
    """
    bank = session.scalar(select(Bank).where(Bank.name == name))
    if bank is None or not bank_applies(session, bank, client_id):
        raise UnknownBankError(f"no bank named {name!r}")
    if write and bank.owner_client_id not in (None, client_id):
        raise BlocklistError(f"bank {name!r} is shared read-only with this client")
    return bank


def client_named(session: Session, name: str) -> ApiClient:
    """The API client called ``name``.

    Raises:
        BlocklistError: no such client.
    """
    client = session.scalar(select(ApiClient).where(ApiClient.name == name))
    if client is None:
        raise BlocklistError(f"no API client named {name!r}")
    return client


def _record(session: Session, bank: Bank, action: str, actor: str, **details: object) -> None:
    record_event(
        session,
        actor=actor,
        action=action,
        target=f"bank:{bank.id}",
        details={"name": bank.name, **details},
    )


def set_owner(session: Session, bank_name: str, client_name: str | None, *, actor: str) -> Bank:
    """Give ``bank_name`` to ``client_name`` (None: back to the deployment), audited
    ``bank.set_owner``. Sharing is left as it is.

    Raises:
        BlocklistError: unknown bank or client.
    """
    bank = get_bank(session, bank_name)
    client = client_named(session, client_name) if client_name is not None else None
    bank.owner_client_id = None if client is None else client.id
    _record(session, bank, "bank.set_owner", actor, owner=client_name)
    return bank


def set_shared(
    session: Session, bank_name: str, client_name: str | None, *, shared: bool, actor: str
) -> Bank:
    """Share ``bank_name`` with ``client_name`` (None: with every client), or stop sharing it
    (``shared=False``; stopping "with all" leaves one-by-one shares and the owner as they
    are), audited ``bank.share`` / ``bank.unshare``; repeating a change is a no-op (still
    audited).

    Raises:
        BlocklistError: unknown bank or client.
    """
    bank = get_bank(session, bank_name)
    if client_name is None:
        bank.shared_with_all = shared
    else:
        client = client_named(session, client_name)
        share = session.get(BankShare, (bank.id, client.id))
        if shared and share is None:
            session.add(BankShare(bank_id=bank.id, client_id=client.id))
        elif not shared and share is not None:
            session.delete(share)
    session.flush()
    action = "bank.share" if shared else "bank.unshare"
    _record(session, bank, action, actor, client=client_name or "*")
    return bank


def share_bank(session: Session, bank_name: str, client_name: str | None, *, actor: str) -> Bank:
    """:func:`set_shared` with ``shared=True``."""
    return set_shared(session, bank_name, client_name, shared=True, actor=actor)


def unshare_bank(session: Session, bank_name: str, client_name: str | None, *, actor: str) -> Bank:
    """:func:`set_shared` with ``shared=False``."""
    return set_shared(session, bank_name, client_name, shared=False, actor=actor)


def sharing_of(session: Session, bank: Bank) -> dict[str, object]:
    """``{"owner": client name or None, "shared_with_all": bool, "shared_with": [names]}``."""
    owner = session.get(ApiClient, bank.owner_client_id) if bank.owner_client_id else None
    names = session.scalars(
        select(ApiClient.name)
        .join(BankShare, BankShare.client_id == ApiClient.id)
        .where(BankShare.bank_id == bank.id)
        .order_by(ApiClient.name)
    ).all()
    return {
        "owner": None if owner is None else owner.name,
        "shared_with_all": bank.shared_with_all,
        "shared_with": list(names),
    }
