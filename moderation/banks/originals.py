"""The opt-in originals vault: a bank created with ``--retain-originals`` keeps each entry's
original image, sealed under its own data key, so an encoder migration
(:mod:`moderation.modelops.encoder_migration`) can embed it again with another encoder.

Each original is a blob file under ``<data dir>/originals/`` holding ciphertext only
(:func:`moderation.crypto.envelope.seal_blob`, AES-256-GCM, bound to the context
``entry-original:<entry id>``); its data key, wrapped by the primary master key, lives in the
:class:`~moderation.storage.encoders.EntryOriginal` row. Removing the entry (deletion, GDPR
erasure) deletes that row and the file: without the wrapped key every copy of the blob, backups
included, is unreadable (crypto-shredding). Whether to keep originals at all is the operator's
legal decision; banks of illegal content will usually not (README "Encoder upgrades").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from moderation.banks.records import BlocklistError
from moderation.crypto.envelope import WrappedKey, open_blob, seal_blob
from moderation.crypto.files import write_private_file
from moderation.crypto.keys import KeyRing
from moderation.storage.encoders import EntryOriginal
from moderation.storage.models import Entry


class OriginalMissingError(BlocklistError):
    """The entry has no retained original (its bank does not keep them, or it was shredded)."""


def vault_dir(data_dir: Path) -> Path:
    """Where the sealed originals of ``data_dir`` live."""
    return data_dir / "originals"


def original_context(entry_id: int) -> str:
    """The context an original's blob and wrapped key are bound to."""
    return f"entry-original:{entry_id}"


def store_original(
    session: Session, entry_id: int, data: bytes, *, keyring: KeyRing, directory: Path
) -> EntryOriginal:
    """Seal ``data`` under a fresh data key to ``directory`` and add the entry's
    :class:`EntryOriginal` row to ``session`` (the caller's transaction; if it fails, the orphan
    file is unreadable without its key).

    Raises:
        OSError: the blob could not be written.
    """
    sealed, wrapped = seal_blob(data, keyring, context=original_context(entry_id))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = _blob_name(entry_id)
    write_private_file(directory / name, [sealed])
    row = EntryOriginal(
        entry_id=entry_id,
        blob_ref=name,
        wrapped_key=wrapped.to_bytes(),
        key_id=wrapped.key_id,
        size_bytes=len(data),
    )
    session.add(row)
    return row


def read_original(session: Session, entry_id: int, *, keyring: KeyRing, directory: Path) -> bytes:
    """Decrypt an entry's original (in memory).

    Raises:
        OriginalMissingError: no original kept for the entry, or its blob is gone.
        moderation.crypto.errors.CryptoError: the blob does not authenticate.
    """
    row = session.get(EntryOriginal, entry_id)
    if row is None:
        raise OriginalMissingError(f"entry e_{entry_id} has no retained original")
    try:
        sealed = (directory / row.blob_ref).read_bytes()
    except FileNotFoundError as exc:
        raise OriginalMissingError(f"entry e_{entry_id}: original blob is missing") from exc
    wrapped = WrappedKey.from_bytes(row.wrapped_key)
    return open_blob(sealed, wrapped, keyring, context=original_context(entry_id))


def retained_ids(session: Session) -> set[int]:
    """The ids of every entry with a retained original."""
    return set(session.scalars(select(EntryOriginal.entry_id)))


def _blob_name(entry_id: int) -> str:
    return f"{entry_id}.original"


def shred_originals(session: Session, entry_ids: Iterable[int], *, directory: Path) -> int:
    """Destroy the wrapped data keys of these entries' originals (rows the database already
    removed with their entry included) and delete their blobs, in the caller's transaction;
    returns how many blobs were deleted."""
    ids = list(entry_ids)
    for start in range(0, len(ids), 500):
        session.execute(
            delete(EntryOriginal).where(EntryOriginal.entry_id.in_(ids[start : start + 500]))
        )
    # Rows whose entry is gone (a bank deleted with its entries) are shredded as well.
    session.execute(delete(EntryOriginal).where(~EntryOriginal.entry_id.in_(select(Entry.id))))
    shredded = 0
    for eid in ids:
        path = directory / _blob_name(eid)
        if path.exists():
            path.unlink()
            shredded += 1
    return shredded


class OriginalsVault:
    """Where an import seals the originals of banks that retain them.

    Args:
        keyring: master keys (the primary wraps each data key).
        directory: the vault directory (:func:`vault_dir`).
    """

    def __init__(self, keyring: KeyRing, directory: Path) -> None:
        self.keyring = keyring
        self.directory = directory

    def store(self, session: Session, entry_id: int, data: bytes) -> EntryOriginal:
        """:func:`store_original` into this vault."""
        return store_original(
            session, entry_id, data, keyring=self.keyring, directory=self.directory
        )

    def read(self, session: Session, entry_id: int) -> bytes:
        """:func:`read_original` from this vault."""
        return read_original(session, entry_id, keyring=self.keyring, directory=self.directory)
