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

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.blocklist.service import EntrySignals, get_bank
from moderation.encoders import Encoder
from moderation.hashing import pdq_hash
from moderation.imaging import DecodeLimits, UnscannableImage, decode_image
from moderation.storage.models import Entry

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


def _file_source(path: Path, ref: str) -> Source:
    return Source(ref=ref, read=path.read_bytes, size=path.stat().st_size)


def _zip_sources(path: Path, prefix: str, skipped: list[tuple[str, str]]) -> Iterator[Source]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        skipped.append((prefix or path.name, f"bad_zip: {exc}"))
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

            def read(archive_path: Path = path, member: str = info.filename) -> bytes:
                with zipfile.ZipFile(archive_path) as again:
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


@dataclass
class _Decoded:
    source: Source
    sha256: str
    image: Image.Image


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


def import_into_bank(
    session: Session,
    bank_name: str,
    paths: Sequence[Path],
    *,
    encoder: Encoder,
    limits: DecodeLimits,
    batch_size: int = 32,
    added_by: str = "cli",
    region_embedder: RegionEmbedder | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ImportReport, list[EntrySignals]]:
    """Create entries for every decodable image under ``paths`` and compute their signals.

    Runs inside the caller's transaction; the caller then writes the snapshot with
    :func:`moderation.blocklist.service.commit_signals`. Duplicates (same SHA-256 already in the
    bank, or twice in this import) and undecodable files are skipped with a reason. Animated
    images contribute their first frame. ``progress(done, total)`` is called after each source.

    Raises:
        BlocklistError: unknown bank.
    """
    bank = get_bank(session, bank_name)
    report = ImportReport(bank=bank.name)
    known = set(session.scalars(select(Entry.source_sha256).where(Entry.bank_id == bank.id)).all())
    signals: list[EntrySignals] = []
    pending: list[_Decoded] = []
    handled = 0

    def flush() -> None:
        if not pending:
            return
        images = [d.image for d in pending]
        vectors, pdqs, regions = compute_signals(
            images, encoder, batch_size=batch_size, region_embedder=region_embedder
        )
        for decoded, vector, (digest, quality), region in zip(
            pending, vectors, pdqs, regions, strict=True
        ):
            entry = Entry(
                bank_id=bank.id,
                label=PurePosixPath(decoded.source.ref).stem,
                source_ref=decoded.source.ref,
                source_sha256=decoded.sha256,
                added_by=added_by,
            )
            session.add(entry)
            session.flush()
            report.added.append(entry.id)
            signals.append(EntrySignals(entry.id, vector, digest, quality, region))
        pending.clear()

    sources = list(iter_sources(paths, report.skipped))
    for source in sources:
        handled += 1
        if progress:
            progress(handled, len(sources))
        if source.size > limits.max_bytes:
            report.skipped.append((source.ref, "too_large"))
            continue
        try:
            data = source.read()
        except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
            report.skipped.append((source.ref, f"unreadable: {exc}"))
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 in known:
            report.skipped.append((source.ref, "duplicate"))
            continue
        try:
            decoded = decode_image(data, limits)
        except UnscannableImage as exc:
            report.skipped.append((source.ref, exc.reason))
            continue
        known.add(sha256)
        pending.append(_Decoded(source, sha256, decoded.frames[0]))
        if len(pending) >= batch_size:
            flush()
    flush()
    logger.info(
        "import into %s: %d added, %d skipped", bank.name, len(report.added), len(report.skipped)
    )
    return report, signals
