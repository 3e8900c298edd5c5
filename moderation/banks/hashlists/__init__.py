"""Hash-list file formats the industry exchanges: parsing into records, and writing them back.

Pure file formats: no database, no crypto. A bank import reads a list (a file, or its bytes in
memory: :class:`~moderation.banks.hashlists.records.ListSource`) with :func:`parse_hash_list`,
refuses the whole list when :attr:`~moderation.banks.hashlists.records.ParsedList.errors` is
not empty, and stores its ``records``; :func:`moderation.banks.hashlists.writer.write_hash_list`
exports records for other services. This module detects the format and dispatches to one
reader per family: :mod:`.plain`, :mod:`.te`, :mod:`.ncmec`, :mod:`.stopncii`; :mod:`.records`
holds what they share (:class:`~moderation.banks.hashlists.records.HashRecord`,
``LineProblem``, ``ParsedList``, ``ListSource``).

The formats follow python-threatexchange (``facebook/ThreatExchange``, ``python-threatexchange/``):

``threatexchange``
    ``signal_type signal`` per line: the ``local_file`` collaboration
    (``threatexchange/exchanges/impl/file_api.py``) and ``threatexchange dataset -P``
    (``cli/dataset_cmd.py``), whose extra fields after the signal (collaboration, category,
    tags) become the label.
``te-csv``
    ``threatexchange dataset -P --csv``: a CSV with the header
    ``signal_type,signal_str,collab,category,tags``; the label is ``category tags``.
``pdq``, ``md5``, ``sha1``, ``sha256``
    One hex value per line (a ``local_file`` collaboration with its ``signal_type`` set).
    ``pdq`` lines may be ``hex,quality`` or ``hex,quality,filename`` (the output of the
    ``pdq-photo-hasher`` tool and of ``pdqhash``); the filename becomes the label.
``ncmec``
    NCMEC hash-sharing entries (``exchanges/clients/ncmec/hash_api.py`` ``NCMECEntryUpdate``):
    JSON Lines, one entry per line with the dataclass's fields (``id``, ``member_id``,
    ``entry_type``, ``deleted``, ``classification``, ``fingerprints``), or the NCMEC XML
    ``queryResult`` document (``<image>``, ``<video>``, ``<deletedImage>``, ``<deletedVideo>``).
    One entry is one record carrying all its supported fingerprints; the label is the
    classification and the ref ``ncmec:<entry id>``.
``stopncii``
    StopNCII hash records (``exchanges/clients/stopncii/api.py`` ``StopNCIIHashRecord``): the
    ``FetchHashes`` JSON document ``{"hashRecords": [...]}`` or JSON Lines of hash records.

Blank lines and lines starting with ``#`` are ignored in every line-based format (plain lists,
``threatexchange``, ``te-csv``, JSON Lines). Values are validated (length, hex digits) and
lowercased. A signal seen earlier in the same file is dropped from later records (first wins);

"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from moderation.banks.hashlists.ncmec import parse_ncmec
from moderation.banks.hashlists.plain import parse_plain
from moderation.banks.hashlists.records import (
    HEX,
    HEX_LENGTHS,
    ListSource,
    ParsedList,
    first_meaningful_line,
    shorten,
)
from moderation.banks.hashlists.stopncii import parse_stopncii
from moderation.banks.hashlists.te import TE_TYPE, parse_te, parse_te_csv

logger = logging.getLogger(__name__)

#: Formats :func:`parse_hash_list` reads (``auto`` detects one of the others).
FORMATS: Final = (
    "auto",
    "threatexchange",
    "te-csv",
    "pdq",
    "md5",
    "sha1",
    "sha256",
    "ncmec",
    "stopncii",
)


def parse_hash_list(
    source: ListSource | Path,
    fmt: str = "auto",
    *,
    progress: Callable[[int], None] | None = None,
) -> ParsedList:
    """Parse a hash list in one of :data:`FORMATS` (see the module docstring): the file at a
    path (streamed), or a :class:`~moderation.banks.hashlists.records.ListSource` (a file, or
    the list's bytes in memory, which are never written anywhere).

    ``progress`` is called with the number of lines (records, for the JSON document and XML
    formats) read so far, every :data:`.records.PROGRESS_EVERY` and once at the end. Reads the
    list as UTF-8 (a byte-order mark is ignored; undecodable bytes fail their line's validation).
    Speed: a plain list of 1,000,000 PDQ lines parses in about 3.5-4.5 s of CPU on the shared
    2-core development machine under load (where an empty 10,000,000-step Python loop takes
    0.33 s); a ``/tmp`` benchmark, not a test. The garbage collector is paused meanwhile
    (:func:`gc_paused`).

    Raises:
        ValueError: ``fmt`` is not in :data:`FORMATS`, or ``auto`` cannot decide (plain
            64-hex-digit lines are PDQ or SHA-256: the message asks for ``--format``).
        OSError: the file cannot be read.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown hash-list format {fmt!r}; expected one of {', '.join(FORMATS)}")
    source = ListSource.of(source)
    if fmt == "auto":
        fmt = detect_format(source)
    out = ParsedList(fmt)
    report = progress or _no_progress
    with gc_paused():
        if fmt in HEX_LENGTHS:
            parse_plain(source, fmt, out, report)
        elif fmt == "threatexchange":
            parse_te(source, out, report)
        elif fmt == "te-csv":
            parse_te_csv(source, out, report)
        elif fmt == "ncmec":
            parse_ncmec(source, out, report)
        else:
            parse_stopncii(source, out, report)
    logger.info(
        "parsed %s as %s: %d records, %d errors, %d skipped, %d duplicates",
        source,
        fmt,
        len(out.records),
        len(out.errors) + out.errors_not_kept,
        len(out.skipped) + out.skipped_not_kept,
        out.duplicates,
    )
    return out


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a list of records is built (also used by the
    bulk import, :func:`moderation.banks.hash_import.import_hash_list`).

    Every record is a new GC-tracked object that lives on, so the collector's passes over
    them find nothing to free; on a million PDQ lines they were about 40% of the parse time.
    The parse makes no reference cycles. Re-enables only what it disabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _no_progress(_count: int) -> None:
    return None


def detect_format(source: ListSource | Path) -> str:
    """Guess the format of a hash list (a file, or a
    :class:`~moderation.banks.hashlists.records.ListSource`) from its first non-blank,
    non-comment line.

    Raises:
        ValueError: the file is empty, or its first line fits no format or several (64 hex
            digits alone: PDQ or SHA-256), with a message that asks for ``--format``.
    """
    source = ListSource.of(source)
    first = first_meaningful_line(source)
    hint = f"pass --format (one of {', '.join(f for f in FORMATS if f != 'auto')})"
    if not first:
        raise ValueError(f"{source.name}: no hash lines to detect the format from; {hint}")
    if first.startswith("<"):
        return "ncmec"
    if first.startswith("{") or first.startswith("["):
        return _detect_json(source, first, hint)
    if first.replace(" ", "").lower().startswith("signal_type,signal_str"):
        return "te-csv"
    head, _, rest = first.partition(",")
    if HEX.fullmatch(head):
        if rest and len(head) == HEX_LENGTHS["pdq"]:
            return "pdq"
        if not rest:
            by_length = {32: "md5", 40: "sha1"}
            if len(head) in by_length:
                return by_length[len(head)]
            if len(head) == 64:
                raise ValueError(
                    f"{source.name}: lines of 64 hex digits may be PDQ or SHA-256 hashes; "
                    "pass --format pdq or --format sha256"
                )
    parts = first.split(None, 1)
    if len(parts) == 2 and TE_TYPE.fullmatch(parts[0]) and not HEX.fullmatch(parts[0]):
        return "threatexchange"
    raise ValueError(f"{source.name}: cannot tell the format from {shorten(first)!r}; {hint}")


def _detect_json(source: ListSource, first: str, hint: str) -> str:
    try:
        obj = json.loads(first)
    except ValueError:
        # Not one object per line: a (pretty-printed) JSON document.
        try:
            with source.open_text() as f:
                obj = json.load(f)
        except ValueError as e:
            raise ValueError(
                f"{source.name}: neither JSON Lines nor a JSON document ({e}); {hint}"
            ) from e
    if isinstance(obj, dict):
        if "hashRecords" in obj or "hashValue" in obj or "signalType" in obj:
            return "stopncii"
        if "fingerprints" in obj or "entry_type" in obj:
            return "ncmec"
    raise ValueError(
        f"{source.name}: JSON that is neither NCMEC entries nor StopNCII records; {hint}"
    )
