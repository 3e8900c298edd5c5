"""Bank import: image files, folders and zip archives -> entries + signals; originals discarded.

Each image is decoded safely, embedded, PDQ-hashed (and, when a region embedder is given, its
region embeddings computed); only those signals and metadata are kept. Skipped inputs are
reported with a reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.banks.originals import OriginalsVault
from moderation.banks.records import get_bank
from moderation.banks.sealed_fields import hmac_key, keyed_sha256, new_entry
from moderation.banks.snapshot_payload import EntrySignals
from moderation.crypto.keys import KeyRing
from moderation.media.decode import DecodeLimits, UnscannableImage, decode_image
from moderation.signals.pdq import pdq_hash
from moderation.storage.models import Entry

if TYPE_CHECKING:
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)

# Zip members whose names say they are not images are skipped without being read.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
# Refuse zip members whose declared expansion ratio marks a zip bomb.
MAX_ZIP_RATIO = 200

RegionEmbedder = Callable[[Sequence[Image.Image]], list[npt.NDArray[np.float32]]]
"""Maps images to their region embeddings, float32 (r, d) each (the classifier stage's)."""


@dataclass(frozen=True)
class Source:
    """One candidate image: where it came from (``ref``) and how to read its bytes."""

    ref: str
    read: Callable[[], bytes]
    size: int


@dataclass
class ImportReport:
    """What an import did: added entry ids, skipped sources with reasons."""

    bank: str
    added: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    snapshot_version: int | None = None
    # SHA-256 of each added image -> its entry id (links training copies to their entry).
    entry_of: dict[str, int] = field(default_factory=dict)
    training_pairs: int = 0


def _file_source(path: Path, ref: str) -> Source:
    return Source(ref=ref, read=path.read_bytes, size=path.stat().st_size)


def _zip_sources(path: Path, prefix: str, skipped: list[tuple[str, str]]) -> Iterator[Source]:
    return zip_sources(lambda: zipfile.ZipFile(path), prefix or "", skipped, label=path.name)


def zip_sources(
    opener: Callable[[], zipfile.ZipFile],
    prefix: str,
    skipped: list[tuple[str, str]],
    *,
    label: str = "archive",
) -> Iterator[Source]:
    """The image members of a zip archive, sorted by name; ``opener`` opens the archive (a file
    or bytes in memory) and is called again for each member read. Members whose names are not
    images, and zip bombs, are appended to ``skipped`` with a reason."""
    try:
        archive = opener()
    except (zipfile.BadZipFile, OSError) as exc:
        skipped.append((prefix or label, f"bad_zip: {exc}"))
        return
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            name = PurePosixPath(info.filename)
            ref = f"{prefix}/{name}" if prefix else str(name)
            if name.suffix.lower() not in IMAGE_SUFFIXES or name.name.startswith("."):
                skipped.append((ref, "not_an_image_name"))
                continue
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
                skipped.append((ref, "zip_bomb"))
                continue

            def read(member: str = info.filename) -> bytes:
                with opener() as again:
                    return again.read(member)

            yield Source(ref=ref, read=read, size=info.file_size)


def iter_sources(paths: Sequence[Path], skipped: list[tuple[str, str]]) -> Iterator[Source]:
    """Walk files, folders (recursively, sorted) and zip files.

    ``Source.ref`` is the path relative to the PATH given (the base name for a single file);
    zip members are ``<zip ref>/<member>`` (just ``<member>`` when the zip itself was given).
    Unreadable paths are appended to ``skipped`` with a reason.
    """
    for root in paths:
        if not root.exists():
            skipped.append((str(root), "not_found"))
        elif root.is_file():
            if zipfile.is_zipfile(root) and root.suffix.lower() == ".zip":
                yield from _zip_sources(root, "", skipped)
            else:
                yield _file_source(root, root.name)
        else:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    path = Path(dirpath) / filename
                    ref = path.relative_to(root).as_posix()
                    if filename.startswith("."):
                        continue
                    if path.suffix.lower() == ".zip":
                        yield from _zip_sources(path, ref, skipped)
                    elif path.suffix.lower() in IMAGE_SUFFIXES:
                        yield _file_source(path, ref)
                    else:
                        skipped.append((ref, "not_an_image_name"))


ImageHook = Callable[[Sequence[Image.Image], Sequence[str]], None]
"""Sees each batch of decoded images (and their SHA-256) before the originals are discarded
(the classifier stage's training copies are made here)."""


@dataclass(frozen=True)
class ImportHooks:
    """What a caller adds to a bank import (the classifier stage's, built by
    :meth:`moderation.service.runtime.Runtime.import_hooks`, so banks never import matching).

    ``region_embedder`` embeds each image's entry windows; ``on_images`` sees each batch of
    decoded images and their SHA-256 (training copies are made there, before the originals are
    discarded); ``after_commit(entry_of, actor)`` runs once the new snapshot is published, with
    each added image's SHA-256 mapped to its entry id, and returns the labelled pairs stored.
    """

    region_embedder: RegionEmbedder | None = None
    on_images: ImageHook | None = None
    after_commit: Callable[[dict[str, int], str], int] | None = None


@dataclass
class _Decoded:
    source: Source
    sha256: str
    source_hmac: str
    image: Image.Image
    data: bytes | None = None  # the original's bytes, only when the bank retains originals


@dataclass(frozen=True)
class PreparedEntry:
    """An image ready to become an entry: where it came from and its signals (no pixels)."""

    ref: str
    sha256: str
    source_hmac: str
    vector: npt.NDArray[np.float32]
    pdq: bytes
    pdq_quality: int
    regions: npt.NDArray[np.float32] | None
    # The original's bytes, kept only for a bank that retains originals (sealed at add_entries).
    original: bytes | None = None


def compute_signals(
    images: Sequence[Image.Image],
    encoder: Encoder,
    *,
    batch_size: int,
    region_embedder: RegionEmbedder | None = None,
) -> tuple[npt.NDArray[np.float32], list[tuple[bytes, int]], list[npt.NDArray[np.float32] | None]]:
    """Embeddings float32 (n, d), PDQ (digest, quality) and optional region embeddings."""
    vectors = encoder.encode(images, batch_size=batch_size)
    hashes = [pdq_hash(img) for img in images]
    pdqs = [(h.digest, h.quality) for h in hashes]
    regions: list[npt.NDArray[np.float32] | None] = (
        list(region_embedder(images)) if region_embedder else [None] * len(images)
    )
    return vectors, pdqs, regions


def prepare_import(
    sources: Sequence[Source],
    skipped: list[tuple[str, str]],
    *,
    known: set[str],
    hmac_key: bytes,
    encoder: Encoder,
    limits: DecodeLimits,
    batch_size: int = 32,
    region_embedder: RegionEmbedder | None = None,
    on_images: ImageHook | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_originals: bool = False,
) -> list[PreparedEntry]:
    """Decode every source and compute its signals, outside any transaction.

    Images whose keyed SHA-256 under ``hmac_key`` (:func:`~moderation.banks.sealed_fields.
    keyed_sha256`) is in ``known`` (already in the bank) or repeats within this import are
    skipped as duplicates; undecodable, unreadable and oversized ones with their reason.
    Animated images contribute their first frame. ``on_images`` sees each batch of decoded
    images before they are dropped. ``progress(done, total)`` is called after each source.
    ``keep_originals``: each prepared entry carries its original bytes (for the originals vault).
    Returns the prepared entries; skipped ``(source ref, reason)`` pairs go to ``skipped``.
    """
    seen = set(known)
    prepared: list[PreparedEntry] = []
    pending: list[_Decoded] = []

    def flush() -> None:
        if pending:
            prepared.extend(
                _signals_of(
                    pending, encoder, batch_size, region_embedder, on_images, keep_originals
                )
            )
            pending.clear()

    for handled, source in enumerate(sources, start=1):
        if progress:
            progress(handled, len(sources))
        decoded = _decode_source(source, limits, seen, skipped, hmac_key)
        if decoded is None:
            continue
        seen.add(decoded.source_hmac)
        pending.append(decoded)
        if len(pending) >= batch_size:
            flush()
    flush()
    return prepared


def _signals_of(
    pending: Sequence[_Decoded],
    encoder: Encoder,
    batch_size: int,
    region_embedder: RegionEmbedder | None,
    on_images: ImageHook | None,
    keep_originals: bool,
) -> list[PreparedEntry]:
    """One batch of decoded sources with their signals (:func:`compute_signals`); ``on_images``
    sees the decoded images first; originals kept when ``keep_originals``."""
    images = [d.image for d in pending]
    vectors, pdqs, regions = compute_signals(
        images, encoder, batch_size=batch_size, region_embedder=region_embedder
    )
    if on_images is not None:
        on_images(images, [d.sha256 for d in pending])
    return [
        PreparedEntry(
            decoded.source.ref,
            decoded.sha256,
            decoded.source_hmac,
            vector,
            digest,
            quality,
            region,
            decoded.data if keep_originals else None,
        )
        for decoded, vector, (digest, quality), region in zip(
            pending, vectors, pdqs, regions, strict=True
        )
    ]


def _decode_source(
    source: Source,
    limits: DecodeLimits,
    seen: set[str],
    skipped: list[tuple[str, str]],
    hmac_key: bytes,
) -> _Decoded | None:
    """Read and decode one source (its first frame), or None with ``(ref, reason)`` appended
    to ``skipped``: too large, unreadable, a duplicate of an image in ``seen``, or
    undecodable."""
    if source.size > limits.max_bytes:
        skipped.append((source.ref, "too_large"))
        return None
    try:
        data = source.read()
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
        skipped.append((source.ref, f"unreadable: {exc}"))
        return None
    sha256 = hashlib.sha256(data).hexdigest()
    source_hmac = keyed_sha256(hmac_key, data)
    if source_hmac in seen:
        skipped.append((source.ref, "duplicate"))
        return None
    try:
        decoded = decode_image(data, limits)
    except UnscannableImage as exc:
        skipped.append((source.ref, exc.reason))
        return None
    return _Decoded(source, sha256, source_hmac, decoded.frames[0], data)


def known_hashes(session: Session, bank_id: int) -> set[str]:
    """Keyed SHA-256 (``entries.source_hmac``) of every entry's source in the bank."""
    rows = session.scalars(select(Entry.source_hmac).where(Entry.bank_id == bank_id)).all()
    return {r for r in rows if r}


def add_entries(
    session: Session,
    bank_name: str,
    prepared: Sequence[PreparedEntry],
    report: ImportReport,
    *,
    keyring: KeyRing,
    added_by: str,
    vault: OriginalsVault | None = None,
) -> list[EntrySignals]:
    """Create the entries of ``prepared`` in the caller's transaction; images that reached the
    bank meanwhile (another import) are skipped as duplicates. Appends to ``report``. With
    ``vault`` and a bank that retains originals, each original is sealed there.

    Raises:
        BlocklistError: unknown bank.
    """
    bank = get_bank(session, bank_name)
    present = known_hashes(session, bank.id)
    signals: list[EntrySignals] = []
    for item in prepared:
        if item.source_hmac in present:
            report.skipped.append((item.ref, "duplicate"))
            continue
        entry = new_entry(
            session,
            keyring,
            bank_id=bank.id,
            label=PurePosixPath(item.ref).stem,
            source_ref=item.ref,
            source_hmac=item.source_hmac,
            added_by=added_by,
        )
        if vault is not None and bank.retain_originals and item.original is not None:
            vault.store(session, entry.id, item.original)
        present.add(item.source_hmac)
        report.added.append(entry.id)
        report.entry_of[item.sha256] = entry.id
        signals.append(
            EntrySignals(entry.id, item.vector, item.pdq, item.pdq_quality, item.regions)
        )
    return signals


def import_into_bank(
    session: Session,
    bank_name: str,
    paths: Sequence[Path],
    *,
    keyring: KeyRing,
    encoder: Encoder,
    limits: DecodeLimits,
    batch_size: int = 32,
    added_by: str = "cli",
    region_embedder: RegionEmbedder | None = None,
    on_images: ImageHook | None = None,
    progress: Callable[[int, int], None] | None = None,
    vault: OriginalsVault | None = None,
) -> tuple[ImportReport, list[EntrySignals]]:
    """Create entries for every decodable image under ``paths`` and compute their signals:
    :func:`prepare_import` then :func:`add_entries`, inside the caller's transaction.

    The caller then writes the snapshot with
    :func:`moderation.banks.versions.commit_signals`. With ``vault``, a bank that retains
    originals keeps them there (:mod:`moderation.banks.originals`).

    Raises:
        BlocklistError: unknown bank.
    """
    bank = get_bank(session, bank_name)
    report = ImportReport(bank=bank.name)
    sources = list(iter_sources(paths, report.skipped))
    prepared = prepare_import(
        sources,
        report.skipped,
        known=known_hashes(session, bank.id),
        hmac_key=hmac_key(session, keyring),
        encoder=encoder,
        limits=limits,
        batch_size=batch_size,
        region_embedder=region_embedder,
        on_images=on_images,
        progress=progress,
        keep_originals=vault is not None and bank.retain_originals,
    )
    signals = add_entries(
        session, bank.name, prepared, report, keyring=keyring, added_by=added_by, vault=vault
    )
    logger.info(
        "import into %s: %d added, %d skipped", bank.name, len(report.added), len(report.skipped)
    )
    return report, signals
