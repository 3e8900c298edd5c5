"""ThreatExchange lists: ``signal_type signal`` lines (``threatexchange``) and the
``threatexchange dataset -P --csv`` CSV (``te-csv``), with TE's signal-type names."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from typing import Final

from moderation.banks.hashlists.records import (
    HEX,
    PROGRESS_EVERY,
    Dedup,
    HashRecord,
    ListSource,
    ParsedList,
    check_value,
    meaningful_lines,
    shorten,
    unsupported_type,
    vpdq_unusable,
)

#: python-threatexchange signal-type names (``SignalType.get_name()``) -> canonical name.
#: ``pdq`` is ``PdqSignal``; ``video_md5`` ``VideoMD5Signal`` (``signal_type/md5.py``);
#: ``video_sha256`` ``VideoSHA256Signal`` (``signal_type/sha256.py``). ``photo_md5``, ``md5``,
#: ``sha1`` and ``sha256`` are not core TE types but are what other exporters and our own
#: writer (for SHA-1, which TE lacks) use. ``vpdq`` is ``VPDQSignal``
#: (``extensions/vpdq/vpdq.py``), whose value is a JSON list (it contains spaces).
TE_SIGNAL_TYPES: Final = {
    "pdq": "pdq",
    "md5": "md5",
    "video_md5": "md5",
    "photo_md5": "md5",
    "sha1": "sha1",
    "sha256": "sha256",
    "video_sha256": "sha256",
    "vpdq": "vpdq",
}

#: Canonical name -> the name :func:`.writer.write_hash_list` gives TE. TE has no photo MD5 or SHA-1
#: type: MD5s go out as ``video_md5`` (the only core TE MD5 type), SHA-1s as ``sha1``, which
#: python-threatexchange ignores as an unknown type.
TE_NAMES_OUT: Final = {
    "pdq": "pdq",
    "md5": "video_md5",
    "sha1": "sha1",
    "sha256": "video_sha256",
    "vpdq": "vpdq",
}

#: TE opinion categories (``exchanges/fetch_state.py`` ``SignalOpinionCategory``), for the
#: ``category`` column of ``te-csv``. Records without one are written as ``POSITIVE_CLASS``:
#: a bank holds content known to be in the class.
TE_CATEGORIES: Final = ("NEGATIVE_CLASS", "INVESTIGATION_SEED", "POSITIVE_CLASS")

#: The ``te-csv`` header, as ``cli/dataset_cmd.py`` writes it.
TE_CSV_HEADER: Final = ("signal_type", "signal_str", "collab", "category", "tags")

#: A TE signal-type name (``SignalType.get_name()``).
TE_TYPE = re.compile(r"[a-z][a-z0-9_]*")


def _te_signal(out: ParsedList, n: int, te_type: str, value: str) -> tuple[str, str] | None:
    """Map a TE ``(signal_type, signal)`` pair; report and return None when refused."""
    canonical = TE_SIGNAL_TYPES.get(te_type)
    if canonical is None:
        out.skip(n, unsupported_type(te_type))
        return None
    try:
        checked = check_value(canonical, value.strip())
    except ValueError as e:
        out.error(n, str(e))
        return None
    unusable = vpdq_unusable(checked) if canonical == "vpdq" else None
    if unusable is not None:
        out.skip(n, unusable)
        return None
    return canonical, checked


def parse_te(source: ListSource, out: ParsedList, report: Callable[[int], None]) -> None:
    dedup = Dedup(out)
    for n, line in meaningful_lines(source, report):
        parts = line.split(None, 2)
        if len(parts) < 2 or not TE_TYPE.fullmatch(parts[0]) or HEX.fullmatch(parts[0]):
            out.error(n, f"expected 'signal_type signal', got {shorten(line)!r}")
            continue
        if parts[0] == "vpdq":
            # python-threatexchange's local_file reader: the signal is the rest of the line.
            parts = [parts[0], line[len(parts[0]) :].strip()]
        mapped = _te_signal(out, n, parts[0], parts[1])
        if mapped is not None:
            label = parts[2].strip() if len(parts) == 3 else ""
            dedup.add(HashRecord(n, dict([mapped]), None, label, f"{source.name}:{n}"))


def parse_te_csv(source: ListSource, out: ParsedList, report: Callable[[int], None]) -> None:
    dedup = Dedup(out)
    count = 0
    with source.open_text() as f:
        reader = csv.reader(f)
        columns: dict[str, int] | None = None
        for row in reader:
            n = reader.line_num
            count += 1
            if count % PROGRESS_EVERY == 0:
                report(count)
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if columns is None:
                columns = {c.strip(): i for i, c in enumerate(row)}
                missing = [c for c in TE_CSV_HEADER[:2] if c not in columns]
                if missing:
                    out.error(
                        n,
                        f"te-csv header must name {', '.join(TE_CSV_HEADER[:2])}, "
                        f"missing {', '.join(missing)}",
                    )
                    return
                continue
            if len(row) != len(columns):
                out.error(n, f"expected {len(columns)} columns, got {len(row)}")
                continue
            mapped = _te_signal(
                out, n, row[columns["signal_type"]].strip(), row[columns["signal_str"]]
            )
            if mapped is None:
                continue
            category = row[columns["category"]].strip() if "category" in columns else ""
            tags = row[columns["tags"]].strip() if "tags" in columns else ""
            label = f"{category} {tags}".strip()
            dedup.add(HashRecord(n, dict([mapped]), None, label, f"{source.name}:{n}"))
    report(count)
