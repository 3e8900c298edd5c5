"""Entry fields sealed at rest: labels and source refs encrypted, source hashes keyed.

A bank's labels and source refs name the banned files, and a plain SHA-256 column would be an
exact-hash list of the banned set; neither is stored readable. Each bank has its own 32-byte
data key, wrapped by the key ring's primary master key in ``banks.entry_key`` (context
``bank:<id>:entry-fields``; :mod:`moderation.governance.keys` re-wraps it on rotation). A label
or source ref is ``AES-256-GCM(bank key, utf-8 text)`` with associated data naming the bank,
the entry and the field, so a sealed value cannot be moved to another entry or field.
Hashes of file contents (``entries.source_hmac``, ``uploads.content_hmac``) are the keyed
SHA-256 of :func:`moderation.signals.exact.keyed` under the deployment's exact-hash key, so
duplicate detection compares keyed values and hash-list exact matches use the same key.

:func:`entry_fields` is the one accessor that decrypts them; everything that shows a label or
a source ref (console, API results, CLI, hash-list export) reads through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session

from moderation.crypto.aead import NONCE_BYTES, TAG_BYTES
from moderation.crypto.deployment import deployment_secret
from moderation.crypto.envelope import WrappedKey, generate_data_key, unwrap_key, wrap_key
from moderation.crypto.errors import DecryptionError
from moderation.crypto.keys import KeyRing
from moderation.signals.exact import EXACT_KEY_NAME, keyed
from moderation.storage.models import Bank, Entry

_AAD_PREFIX = b"moderation/entry-field/v1\x00"


def bank_key_context(bank_id: int) -> str:
    """The wrap context of bank ``bank_id``'s entry-field data key."""
    return f"bank:{bank_id}:entry-fields"


def field_aad(bank_id: int, entry_id: int, field: str) -> bytes:
    """Associated data binding a sealed value to its bank, entry and field."""
    return _AAD_PREFIX + f"{bank_id}\x00{entry_id}\x00{field}".encode()


def bank_key(session: Session, keyring: KeyRing, bank_id: int) -> bytes:
    """Bank ``bank_id``'s 32-byte entry-field key, created (and wrapped) on first use.

    Column-level SQL only (no ORM ``Bank`` load), so migration 0012 can call it whatever
    columns later revisions add to ``banks``.

    Raises:
        moderation.crypto.errors.CryptoError: the stored key does not unwrap under ``keyring``.
    """
    context = bank_key_context(bank_id)
    wrapped = session.scalar(select(Bank.entry_key).where(Bank.id == bank_id))
    if wrapped is None:
        key = generate_data_key()
        new = wrap_key(key, keyring, context=context).to_bytes()
        session.execute(update(Bank).where(Bank.id == bank_id).values(entry_key=new))
        return key
    return unwrap_key(WrappedKey.from_bytes(wrapped), keyring, context=context)


def seal_entry(
    session: Session, keyring: KeyRing, entry: Entry, *, label: str, source_ref: str
) -> None:
    """Set ``entry``'s sealed label and source ref (the entry must have its id: flush first).

    Raises:
        moderation.crypto.errors.CryptoError: the bank key does not unwrap.
    """
    sealer = BankSealer(session, keyring, entry.bank_id)
    entry.label_sealed = sealer.seal(entry.id, "label", label[:500])
    entry.source_ref_sealed = sealer.seal(entry.id, "source_ref", source_ref[:1000])


def new_entry(
    session: Session,
    keyring: KeyRing,
    *,
    bank_id: int,
    label: str,
    source_ref: str = "",
    **columns: Any,
) -> Entry:
    """Add an entry to ``bank_id`` with its label and source ref sealed; flushed (has its id).

    ``columns``: other :class:`~moderation.storage.models.Entry` columns (``source_hmac``,
    ``upload_id``, ``added_by``, ...).
    """
    entry = Entry(bank_id=bank_id, **columns)
    session.add(entry)
    session.flush()
    seal_entry(session, keyring, entry, label=label, source_ref=source_ref)
    return entry


@dataclass(frozen=True)
class EntryFields:
    """An entry's decrypted label and source ref."""

    label: str
    source_ref: str


class _Opener:
    """Decrypts sealed fields, unwrapping each bank's key once (one AES-GCM context per bank)."""

    def __init__(self, session: Session, keyring: KeyRing) -> None:
        self._session, self._keyring = session, keyring
        self._aeads: dict[int, AESGCM | None] = {}

    def _aead(self, bank_id: int) -> AESGCM | None:
        if bank_id not in self._aeads:
            wrapped = self._session.scalar(select(Bank.entry_key).where(Bank.id == bank_id))
            self._aeads[bank_id] = (
                None
                if wrapped is None
                else AESGCM(
                    unwrap_key(
                        WrappedKey.from_bytes(wrapped),
                        self._keyring,
                        context=bank_key_context(bank_id),
                    )
                )
            )
        return self._aeads[bank_id]

    def open(self, bank_id: int, entry_id: int, field: str, sealed: bytes | None) -> str:
        aead = self._aead(bank_id) if sealed is not None else None
        if sealed is None or aead is None:
            return ""
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError(f"cannot decrypt entry {entry_id} {field}: too short")
        try:
            text = aead.decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], field_aad(bank_id, entry_id, field)
            )
        except InvalidTag:
            raise DecryptionError(
                f"cannot decrypt entry {entry_id} {field}: authentication failed (wrong key, "
                "a value moved from another entry or field, or altered bytes)"
            ) from None
        return text.decode("utf-8")


def entry_fields(
    session: Session, keyring: KeyRing, entry_ids: Iterable[int]
) -> dict[int, EntryFields]:
    """The decrypted label and source ref of each existing entry in ``entry_ids``.

    The one accessor for these fields: callers that must hide labels (e.g. from other tenants)
    filter what they pass in. Missing ids are left out.

    Raises:
        moderation.crypto.errors.CryptoError: a bank key does not unwrap, or a sealed value
            does not authenticate (tampered, or moved from another entry).
    """
    wanted = list(dict.fromkeys(entry_ids))
    opener = _Opener(session, keyring)
    fields: dict[int, EntryFields] = {}
    for start in range(0, len(wanted), 10_000):
        rows = session.execute(
            select(Entry.id, Entry.bank_id, Entry.label_sealed, Entry.source_ref_sealed).where(
                Entry.id.in_(wanted[start : start + 10_000])
            )
        ).all()
        for eid, bank_id, label, ref in rows:
            fields[eid] = EntryFields(
                opener.open(bank_id, eid, "label", label),
                opener.open(bank_id, eid, "source_ref", ref),
            )
    return fields


def entry_labels(session: Session, keyring: KeyRing, entry_ids: Iterable[int]) -> dict[int, str]:
    """Entry id -> decrypted label (:func:`entry_fields`, labels only)."""
    return {eid: f.label for eid, f in entry_fields(session, keyring, entry_ids).items()}


def hmac_key(session: Session, keyring: KeyRing) -> bytes:
    """The deployment's exact-hash HMAC key (created on first use)."""
    return deployment_secret(session, keyring, EXACT_KEY_NAME)


def keyed_sha256(key: bytes, data: bytes) -> str:
    """Hex of the keyed SHA-256 of ``data`` (64 characters): what ``entries.source_hmac`` and
    ``uploads.content_hmac`` store."""
    return keyed(key, "sha256", hashlib.sha256(data).digest()).hex()


def content_hmac(session: Session, keyring: KeyRing, data: bytes) -> str:
    """:func:`keyed_sha256` of ``data`` under the deployment's exact-hash key."""
    return keyed_sha256(hmac_key(session, keyring), data)


class BankSealer:
    """Seals many entries of one bank with one AES-GCM context (bulk hash-list imports)."""

    def __init__(self, session: Session, keyring: KeyRing, bank_id: int) -> None:
        self.bank_id = bank_id
        self._aead = AESGCM(bank_key(session, keyring, bank_id))

    def seal(self, entry_id: int, field: str, value: str) -> bytes:
        """``nonce (12) || AES-256-GCM(bank key, utf-8 value) || tag (16)`` bound to (bank,
        entry, field) by :func:`field_aad`."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = field_aad(self.bank_id, entry_id, field)
        return nonce + self._aead.encrypt(nonce, value.encode("utf-8"), aad)


def seal_legacy_rows(
    session: Session, keyring: KeyRing, rows: Sequence[Any]
) -> list[dict[str, Any]]:
    """Sealed column values for plaintext ``(id, bank_id, label, source_ref, source_sha256)``
    rows (migration 0012): ``{"id", "label_sealed", "source_ref_sealed", "source_hmac"}``."""
    key = hmac_key(session, keyring)
    sealers: dict[int, BankSealer] = {}
    out: list[dict[str, Any]] = []
    for eid, bank_id, label, ref, sha in rows:
        if bank_id not in sealers:
            sealers[bank_id] = BankSealer(session, keyring, bank_id)
        sealer = sealers[bank_id]
        out.append(
            {
                "id": eid,
                "label_sealed": sealer.seal(eid, "label", label or ""),
                "source_ref_sealed": sealer.seal(eid, "source_ref", ref or ""),
                "source_hmac": keyed(key, "sha256", bytes.fromhex(sha)).hex() if sha else None,
            }
        )
    return out


LegacySealer = Callable[
    [Connection, Sequence[Any], Sequence[Any]], tuple[list[dict[str, Any]], list[dict[str, Any]]]
]
"""Migration 0012's hook: (connection, plaintext entry rows, ``(upload id, sha256 hex)`` rows)
-> (entry column values, ``{"id", "content_hmac"}`` upload values)."""


def migration_attributes(keyring: KeyRing) -> dict[str, Any]:
    """Alembic config attributes that let migration 0012 seal existing plaintext rows with
    ``keyring`` (``moderation.storage.db.migrate(engine, attributes=...)``): the migrations
    themselves never import the crypto layer."""

    def seal(
        connection: Connection, entries: Sequence[Any], uploads: Sequence[Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with Session(bind=connection) as session:
            key = hmac_key(session, keyring)
            entry_values = seal_legacy_rows(session, keyring, entries)
            upload_values = [
                {"id": uid, "content_hmac": keyed(key, "sha256", bytes.fromhex(sha)).hex()}
                for uid, sha in uploads
            ]
            session.commit()  # joins the migration's transaction: commits nothing by itself
        return entry_values, upload_values

    sealer: LegacySealer = seal
    return {"entry_sealer": sealer}


def seal_bank_note(
    session: Session, keyring: KeyRing, bank_id: int, purpose: str, value: Any
) -> str:
    """``value`` (JSON-able) sealed under bank ``bank_id``'s key for a JSON column (base64),
    bound to ``purpose`` (e.g. ``job:<id>:skipped``: the file names an import skipped)."""
    sealed = BankSealer(session, keyring, bank_id).seal(0, purpose, json.dumps(value))
    return base64.b64encode(sealed).decode("ascii")


def open_bank_note(
    session: Session, keyring: KeyRing, bank_id: int, purpose: str, sealed: str
) -> Any:
    """Inverse of :func:`seal_bank_note`.

    Raises:
        moderation.crypto.errors.CryptoError: wrong bank, purpose or key; altered bytes.
    """
    text = _Opener(session, keyring).open(bank_id, 0, purpose, base64.b64decode(sealed))
    return json.loads(text)
