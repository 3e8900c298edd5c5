"""What every hash-list reader shares: the record and problem types, value validation, first-wins
merging of repeated signals, and reading the list's lines from a file or from memory
(:class:`ListSource`)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, TextIO

from moderation.signals.pdq import PDQ_MIN_QUALITY
from moderation.signals.vpdq import VPDQ_QUALITY_THRESHOLD, parse_signal_str, to_signal_str, usable

#: Canonical signal-type names of a photo's signals inside the service.
SIGNAL_TYPES: Final = ("pdq", "md5", "sha1", "sha256")
#: ... and every signal type a hash list may carry: those plus a video's vPDQ signature, whose
#: value is python-threatexchange's ``VPDQSignal`` string (:mod:`moderation.signals.vpdq`).
LIST_SIGNAL_TYPES: Final = (*SIGNAL_TYPES, "vpdq")

#: PDQ hashes below this quality are refused (skipped). python-threatexchange
#: ``signal_type/pdq/signal.py`` ``PdqSignal.QUALITY_THRESHOLD = 50``; the same constant as
#: :data:`moderation.signals.pdq.PDQ_MIN_QUALITY` (ThreatExchange ``pdq/README.md``).
PDQ_QUALITY_THRESHOLD: Final = PDQ_MIN_QUALITY

#: Hex digits per value of each signal type (PDQ: 256 bits; MD5: 128; SHA-1: 160; SHA-256: 256).
HEX_LENGTHS: Final = {"pdq": 64, "md5": 32, "sha1": 40, "sha256": 64}

#: Lines (or records) between two calls of the ``progress`` callback.
PROGRESS_EVERY: Final = 10_000

#: At most this many errors and skipped lines are kept each; the rest are only counted
#: (:attr:`ParsedList.errors_not_kept`, :attr:`ParsedList.skipped_not_kept`), so that a garbage
#: file of millions of lines cannot fill memory with problem reports.
MAX_PROBLEMS_KEPT: Final = 10_000

HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True, slots=True)
class HashRecord:
    """One entry of a hash list: its signals and where it came from."""

    #: 1-based line number; record number for the JSON document and XML formats.
    line: int
    #: Canonical signal type (one of :data:`LIST_SIGNAL_TYPES`) -> lowercase hex value (for
    #: ``vpdq``: the canonical ``VPDQSignal`` string, :func:`check_value`).
    signals: dict[str, str]
    #: PDQ quality 0-100 when the file says, else None.
    pdq_quality: int | None
    #: Metadata: TE category and tags, NCMEC classification, a filename... or "".
    label: str
    #: Where it came from: ``"list.txt:17"``, ``"ncmec:<entry id>"``, ``"stopncii:<cases>"``.
    ref: str


@dataclass(frozen=True, slots=True)
class LineProblem:
    """Why one line (or record) was refused."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ParsedList:
    """The result of :func:`moderation.banks.hashlists.parse_hash_list`.

    ``errors`` are malformed lines: the caller imports nothing when there is any. ``skipped``
    are well-formed lines refused on purpose (PDQ quality below :data:`PDQ_QUALITY_THRESHOLD`,
    an unsupported signal type, deleted NCMEC entries and withdrawn StopNCII hashes): reported,
    not fatal. ``deleted`` holds the refs of the deletions (``ncmec:<id>``,
    ``stopncii:<type>:<hash>``) so that a bank fed by an update stream can remove them.
    """

    format: str
    records: list[HashRecord] = field(default_factory=list)
    errors: list[LineProblem] = field(default_factory=list)
    skipped: list[LineProblem] = field(default_factory=list)
    #: Records dropped because every signal in them appeared earlier in the file.
    duplicates: int = 0
    deleted: list[str] = field(default_factory=list)
    errors_not_kept: int = 0
    skipped_not_kept: int = 0

    def error(self, line: int, reason: str) -> None:
        """Record a malformed line (kept up to :data:`MAX_PROBLEMS_KEPT`)."""
        if len(self.errors) < MAX_PROBLEMS_KEPT:
            self.errors.append(LineProblem(line, reason))
        else:
            self.errors_not_kept += 1

    def skip(self, line: int, reason: str) -> None:
        """Record a refused line (kept up to :data:`MAX_PROBLEMS_KEPT`)."""
        if len(self.skipped) < MAX_PROBLEMS_KEPT:
            self.skipped.append(LineProblem(line, reason))
        else:
            self.skipped_not_kept += 1


class Dedup:
    """First-wins merging of signals across the records of one file."""

    def __init__(self, out: ParsedList) -> None:
        self.out = out
        self.seen: set[tuple[str, str]] = set()

    def add(self, record: HashRecord) -> None:
        new = {t: v for t, v in record.signals.items() if (t, v) not in self.seen}
        if not new:
            self.out.duplicates += 1
            return
        self.seen.update(new.items())
        if len(new) != len(record.signals):
            quality = record.pdq_quality if "pdq" in new else None
            record = HashRecord(record.line, new, quality, record.label, record.ref)
        self.out.records.append(record)


def check_value(signal_type: str, value: str) -> str:
    """Validate one value of a canonical signal type and return it canonical: hex lowercased;
    a ``vpdq`` signal re-serialised as python-threatexchange writes it
    (:func:`moderation.signals.vpdq.to_signal_str`, so a list that ``VPDQSignal`` wrote comes
    back byte for byte).

    Raises:
        ValueError: with a reason such as ``pdq value must be 64 hex characters, got 63``, or
            ``invalid vPDQ feature 3: ...``.
    """
    if signal_type == "vpdq":
        return to_signal_str(parse_signal_str(value))
    want = HEX_LENGTHS[signal_type]
    if len(value) != want:
        raise ValueError(f"{signal_type} value must be {want} hex characters, got {len(value)}")
    if not HEX.fullmatch(value):
        raise ValueError(f"{signal_type} value must be hex digits, got {shorten(value)!r}")
    return value.lower()


def vpdq_unusable(value: str) -> str | None:
    """Why a canonical ``vpdq`` value cannot be matched (no frame of quality >=
    :data:`~moderation.signals.vpdq.VPDQ_QUALITY_THRESHOLD`: python-threatexchange's
    ``VPDQIndex.add`` refuses such a video), else None."""
    if usable(parse_signal_str(value)):
        return None
    return f"vpdq signal has no frame of quality >= {VPDQ_QUALITY_THRESHOLD}"


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def unsupported_type(signal_type: str) -> str:
    return f"unsupported signal type {shorten(signal_type)!r}"


@dataclass(frozen=True, slots=True)
class ListSource:
    """A hash list to parse: a file, streamed by path, or its content held in memory.

    The in-memory form lets a caller that holds the list decrypted (the console's import job,
    :mod:`moderation.banks.hash_jobs`) parse it without writing it anywhere. Either way it is
    read as UTF-8 (a byte-order mark is ignored; undecodable bytes become U+FFFD and fail their
    line's validation).
    """

    #: Names the list in record refs (``name:line``), messages and logs; a file's own name.
    name: str
    path: Path | None = None
    #: The list's bytes; never in the repr (a plaintext hash list must not reach a log).
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("a ListSource holds either a path or bytes")

    @classmethod
    def of(cls, source: ListSource | Path) -> ListSource:
        """``source`` itself, or the file at that path."""
        if isinstance(source, ListSource):
            return source
        return cls(source.name, path=source)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> ListSource:
        """A list held in memory, named ``name``."""
        return cls(name, data=data)

    @property
    def stem(self) -> str:
        """``name`` without its last suffix (as :attr:`pathlib.PurePath.stem`)."""
        return PurePosixPath(self.name).stem

    def open_text(self, newline: str | None = "") -> TextIO:
        """The list as text (``newline`` as :func:`open`'s: ``""`` keeps line endings)."""
        if self.path is not None:
            return self.path.open(encoding="utf-8-sig", errors="replace", newline=newline)
        assert self.data is not None  # __post_init__: one of the two
        return io.TextIOWrapper(
            io.BytesIO(self.data), encoding="utf-8-sig", errors="replace", newline=newline
        )

    def read_text(self) -> str:
        """The whole list as one string, line endings translated to ``\\n``."""
        with self.open_text(newline=None) as f:
            return f.read()

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.name


def first_meaningful_line(source: ListSource) -> str:
    with source.open_text() as f:
        for raw in f:
            line = raw.strip()
            if line and not line.startswith("#"):
                return line
    return ""


def meaningful_lines(
    source: ListSource, report: Callable[[int], None]
) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, stripped line)`` for every line that is neither blank nor a ``#``
    comment; ``report`` gets the lines read every :data:`PROGRESS_EVERY` and the total at the
    end (the readers' one line loop)."""
    n = 0
    with source.open_text() as f:
        for n, raw in enumerate(f, 1):
            if n % PROGRESS_EVERY == 0:
                report(n)
            line = raw.strip()
            if line and line[0] != "#":
                yield n, line
    report(n)


def json_lines(
    source: ListSource, out: ParsedList, report: Callable[[int], None]
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, decoded object)`` for each JSON Lines line; report bad JSON."""
    for n, line in meaningful_lines(source, report):
        try:
            yield n, json.loads(line)
        except ValueError as e:
            out.error(n, f"invalid JSON: {e}")
