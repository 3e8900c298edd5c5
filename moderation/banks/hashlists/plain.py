"""Plain lists: one hex value per line (``pdq``, ``md5``, ``sha1``, ``sha256``); ``pdq`` lines may
carry ``,quality`` and ``,filename``."""

from __future__ import annotations

import re
from collections.abc import Callable

from moderation.banks.hashlists.records import (
    HEX_LENGTHS,
    PDQ_QUALITY_THRESHOLD,
    HashRecord,
    ListSource,
    ParsedList,
    check_value,
    meaningful_lines,
    shorten,
)

_INT = re.compile(r"[0-9]{1,3}")


def _check_quality(text: str) -> int:
    if not _INT.fullmatch(text) or int(text) > 100:
        raise ValueError(f"PDQ quality must be an integer 0-100, got {shorten(text)!r}")
    return int(text)


def _low_quality(quality: int) -> str:
    return f"PDQ quality {quality} is below {PDQ_QUALITY_THRESHOLD}"


def parse_plain(
    source: ListSource, signal_type: str, out: ParsedList, report: Callable[[int], None]
) -> None:
    # The hot path (millions of PDQ lines): one fullmatch per line, no per-line function calls
    # on the happy path.
    want = HEX_LENGTHS[signal_type]
    value_re = re.compile(rf"[0-9a-fA-F]{{{want}}}")
    name = source.name
    is_pdq = signal_type == "pdq"
    seen: set[str] = set()
    records = out.records
    for n, line in meaningful_lines(source, report):
        quality: int | None = None
        label = ""
        if is_pdq and "," in line:
            parts = line.split(",", 2)
            line = parts[0].strip()
            try:
                quality = _check_quality(parts[1].strip())
            except ValueError as e:
                out.error(n, str(e))
                continue
            if len(parts) == 3:
                label = parts[2].strip()
        if value_re.fullmatch(line) is None:
            try:
                check_value(signal_type, line)
            except ValueError as e:
                out.error(n, str(e))
            continue
        value = line.lower()
        if quality is not None and quality < PDQ_QUALITY_THRESHOLD:
            out.skip(n, _low_quality(quality))
            continue
        if value in seen:
            out.duplicates += 1
            continue
        seen.add(value)
        records.append(HashRecord(n, {signal_type: value}, quality, label, f"{name}:{n}"))
