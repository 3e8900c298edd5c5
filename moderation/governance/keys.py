"""Master-key rotation: re-wrap every stored data key under the primary master key.

Data keys themselves never change, so rotation rewrites only small wrapped keys (snapshot
headers, database columns): no ciphertext is re-encrypted and screening keeps running. The
steps, in order (RELIABILITY.md E4): add a new key and make it primary, re-wrap everything,
then retire the old keys. Old copies of snapshots or blobs wrapped under a retired key are
unreadable afterwards.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.originals import original_context
from moderation.banks.sealed_fields import bank_key_context
from moderation.banks.snapshot import rewrap_snapshot
from moderation.crypto.envelope import WrappedKey, rewrap_key
from moderation.crypto.keys import KeyRing
from moderation.governance.users import totp_context
from moderation.matching.golden import item_context
from moderation.storage.db import transaction
from moderation.storage.encoders import EntryOriginal
from moderation.storage.modelops import CanaryItem
from moderation.storage.models import (
    ApiClient,
    Bank,
    DeploymentSecret,
    IndexSnapshot,
    Subject,
    Upload,
    User,
)

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class RotationReport:
    """Counts of re-wrapped objects per store, and the key ids involved."""

    primary: str
    retired: list[str] = field(default_factory=list)
    rewrapped: dict[str, int] = field(default_factory=dict)
    obsolete_files: list[Path] = field(default_factory=list)


RewrapStep = Callable[[Session, KeyRing, Path, RotationReport], int]
"""Re-wraps one store's data keys to the primary key; returns how many it changed."""


def _rewrap_snapshots(
    session: Session, keyring: KeyRing, snapshots_dir: Path, report: RotationReport
) -> int:
    # The re-wrapped snapshot goes to a new file and the row points at it, so a rolled-back
    # transaction leaves the current file and row consistent; the old file is deleted by the
    # caller only after the commit.
    count = 0
    for row in session.scalars(select(IndexSnapshot)):
        path = snapshots_dir / Path(row.path).name
        if not path.exists() or row.key_id == keyring.primary_id:
            continue
        new_path = path.with_name(f"{row.snapshot_id}-v{row.version}-{keyring.primary_id}.snapshot")
        shutil.copyfile(path, new_path)
        written = rewrap_snapshot(new_path, keyring)
        row.path, row.key_id = new_path.name, written.key_id
        row.sha256, row.size_bytes = written.sha256, written.size_bytes
        report.obsolete_files.append(path)
        count += 1
    return count


def _rewrap_uploads(session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport) -> int:
    count = 0
    query = select(Upload).where(
        Upload.wrapped_key.is_not(None), Upload.key_id != keyring.primary_id
    )
    for upload in session.scalars(query):
        assert upload.wrapped_key is not None
        wrapped = rewrap_key(
            WrappedKey.from_bytes(upload.wrapped_key), keyring, context=f"upload:{upload.id}"
        )
        upload.wrapped_key, upload.key_id = wrapped.to_bytes(), wrapped.key_id
        count += 1
    return count


def _rewrap_column(
    rows: Iterable[Any], column: str, keyring: KeyRing, context: Callable[[Any], str]
) -> int:
    """Re-wrap ``row.<column>`` (a wrapped key) of each row under the primary key.

    Rows already under the primary key are left alone; ``context(row)`` is the wrap context the
    key was bound to. Returns how many rows changed.
    """
    count = 0
    for row in rows:
        old = WrappedKey.from_bytes(getattr(row, column))
        if old.key_id == keyring.primary_id:
            continue
        setattr(row, column, rewrap_key(old, keyring, context=context(row)).to_bytes())
        count += 1
    return count


def _rewrap_subjects(session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport) -> int:
    rows = session.scalars(select(Subject).where(Subject.secret.is_not(None)))
    return _rewrap_column(rows, "secret", keyring, lambda s: f"subject:{s.lookup}")


def _rewrap_deployment_secrets(
    session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport
) -> int:
    rows = session.scalars(select(DeploymentSecret))
    return _rewrap_column(rows, "wrapped", keyring, lambda r: f"deployment-secret:{r.name}")


def _rewrap_user_totp(session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport) -> int:
    rows = session.scalars(select(User).where(User.totp_secret.is_not(None)))
    return _rewrap_column(rows, "totp_secret", keyring, lambda u: totp_context(u.id))


def _rewrap_api_clients(session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport) -> int:
    # Callback signing secrets of upload-hook clients (moderation.service.api_clients).
    rows = (c for c in session.scalars(select(ApiClient)) if c.callback_secret)
    return _rewrap_column(
        rows, "callback_secret", keyring, lambda c: f"api-client:{c.id}:callback-secret"
    )


def _rewrap_entry_originals(
    session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport
) -> int:
    # Data keys of the originals vault (moderation.banks.originals).
    rows = list(session.scalars(select(EntryOriginal)))
    count = _rewrap_column(rows, "wrapped_key", keyring, lambda o: original_context(o.entry_id))
    for row in rows:
        row.key_id = WrappedKey.from_bytes(row.wrapped_key).key_id
    return count


def _rewrap_bank_entry_keys(
    session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport
) -> int:
    # The keys sealing entry labels and source refs (moderation.banks.sealed_fields).
    rows = session.scalars(select(Bank).where(Bank.entry_key.is_not(None)))
    return _rewrap_column(rows, "entry_key", keyring, lambda b: bank_key_context(b.id))


def _rewrap_canary_items(session: Session, keyring: KeyRing, _dir: Path, _r: RotationReport) -> int:
    # The golden set's images (moderation.matching.golden), one data key each.
    rows = session.scalars(select(CanaryItem))
    return _rewrap_column(rows, "wrapped_key", keyring, lambda i: item_context(i.id))


REWRAP_STEPS: dict[str, RewrapStep] = {
    "snapshots": _rewrap_snapshots,
    "uploads": _rewrap_uploads,
    "subjects": _rewrap_subjects,
    "deployment_secrets": _rewrap_deployment_secrets,
    "user_totp_secrets": _rewrap_user_totp,
    "api_clients": _rewrap_api_clients,
    "entry_originals": _rewrap_entry_originals,
    "bank_entry_keys": _rewrap_bank_entry_keys,
    "canary_items": _rewrap_canary_items,
}
"""Every store holding wrapped data keys. A feature that stores new wrapped keys adds its step."""


def rewrap_all(
    session: Session, keyring: KeyRing, snapshots_dir: Path, *, actor: str = "cli"
) -> RotationReport:
    """Re-wrap every stored data key under ``keyring``'s primary key, in one transaction.

    Raises:
        moderation.crypto.errors.UnknownKeyError: something is wrapped under a key the ring lacks
            (nothing is changed: the transaction rolls back).
    """
    report = RotationReport(primary=keyring.primary_id)
    for name, step in REWRAP_STEPS.items():
        report.rewrapped[name] = step(session, keyring, snapshots_dir, report)
    record_event(
        session,
        actor=actor,
        action="keys.rotate",
        target=f"key:{keyring.primary_id}",
        details={"rewrapped": report.rewrapped, "key_ids": list(keyring.key_ids)},
    )
    logger.info("re-wrapped data keys under %s: %s", keyring.primary_id, report.rewrapped)
    return report


def rotate_keys(runtime: Runtime, *, retire_old: bool, actor: str) -> RotationReport:
    """Rotate master keys (RELIABILITY.md E4) and re-wrap every stored data key.

    With a key file: generate a key, make it primary (saved before anything is re-wrapped, so a
    crash leaves every object readable), re-wrap all stores in one transaction, delete the
    superseded snapshot files, then (``retire_old``) drop the old keys from the file. With
    ``MODERATION_MASTER_KEYS``: re-wrap under the variable's first key; retiring is done by
    removing old keys from the variable afterwards.

    Raises:
        moderation.crypto.errors.UnknownKeyError: something is wrapped under a key the ring lacks.
    """
    settings = runtime.settings
    snapshots_dir = settings.snapshots_dir
    if settings.master_keys is not None:
        ring = runtime.keyring
        with transaction(runtime.sessions) as session:
            report = rewrap_all(session, ring, snapshots_dir, actor=actor)
    else:
        path = settings.key_file_path
        old = KeyRing.load_file(path)
        ring = old.with_new_primary()
        ring.save_file(path)
        with transaction(runtime.sessions) as session:
            report = rewrap_all(session, ring, snapshots_dir, actor=actor)
        if retire_old:
            for key_id in old.key_ids:
                ring = ring.without(key_id)
            ring.save_file(path)
            report.retired = list(old.key_ids)
            with transaction(runtime.sessions) as session:
                record_event(
                    session,
                    actor=actor,
                    action="keys.retire",
                    target=f"key:{','.join(old.key_ids)}",
                    details={"primary": ring.primary_id},
                )
    for obsolete in report.obsolete_files:
        obsolete.unlink(missing_ok=True)
    runtime.__dict__["keyring"] = ring
    logger.info("key rotation done: primary %s, retired %s", report.primary, report.retired)
    return report
