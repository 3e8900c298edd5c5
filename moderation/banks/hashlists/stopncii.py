"""StopNCII hash records: the ``FetchHashes`` document ``{"hashRecords": [...]}`` or JSON Lines."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Final

from moderation.banks.hashlists.records import (
    Dedup,
    HashRecord,
    ListSource,
    ParsedList,
    check_value,
    first_meaningful_line,
    json_lines,
    unsupported_type,
)

#: StopNCII ``signalType`` (``stopncii/api.py`` ``StopNCIISignalType``) -> canonical name,
#: as ``exchanges/impl/stop_ncii_api.py`` maps them (``ImagePDQ`` -> PDQ, ``VideoMD5`` -> MD5).
STOPNCII_SIGNAL_TYPES: Final = {"ImagePDQ": "pdq", "VideoMD5": "md5"}

#: StopNCII ``hashStatus`` values that tell the client to delete the hash (``StopNCIICaseStatus``).
STOPNCII_DELETED_STATUSES: Final = frozenset({"Withdrawn", "Deleted"})


def parse_stopncii(source: ListSource, out: ParsedList, report: Callable[[int], None]) -> None:
    dedup = Dedup(out)
    records: Iterable[tuple[int, Any]]
    first = first_meaningful_line(source)
    try:
        whole = json.loads(first)
        is_document = isinstance(whole, dict) and "hashRecords" in whole
    except ValueError:
        is_document = True  # not one object per line: a (pretty-printed) document
    if is_document:
        hash_records = _stopncii_document(source, out)
        if hash_records is None:
            return
        records = enumerate(hash_records, 1)
        total = len(hash_records)
    else:
        records = json_lines(source, out, report)
        total = 0
    for n, record in records:
        try:
            parsed = _stopncii_record(out, n, record, source.name)
        except ValueError as e:
            out.error(n, str(e))
            continue
        if parsed is not None:
            dedup.add(parsed)
    if is_document:
        report(total)


def _stopncii_document(source: ListSource, out: ParsedList) -> list[Any] | None:
    """The ``hashRecords`` list of a ``FetchHashes`` document; None (reported) if malformed."""
    try:
        with source.open_text() as f:
            document = json.load(f)
    except json.JSONDecodeError as e:
        out.error(e.lineno, f"invalid JSON: {e}")
        return None
    if not isinstance(document, dict) or not isinstance(document.get("hashRecords"), list):
        out.error(1, 'a StopNCII document must be an object with a "hashRecords" list')
        return None
    hash_records: list[Any] = document["hashRecords"]
    return hash_records


def _stopncii_record(out: ParsedList, n: int, record: Any, name: str) -> HashRecord | None:
    """One StopNCII hash record -> a record, or None if refused.

    Raises:
        ValueError: the record is malformed.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"a StopNCII hash record must be a JSON object, got {type(record).__name__}"
        )
    signal_type = record.get("signalType")
    value = record.get("hashValue")
    if not isinstance(signal_type, str) or not isinstance(value, str):
        raise ValueError("a StopNCII hash record needs string signalType and hashValue")
    canonical = STOPNCII_SIGNAL_TYPES.get(signal_type)
    if canonical is None:
        out.skip(n, unsupported_type(signal_type))
        return None
    value = check_value(canonical, value.strip())
    cases = record.get("caseNumbers") or {}
    if not isinstance(cases, dict | list):
        raise ValueError("StopNCII caseNumbers must be an object or a list")
    status = record.get("hashStatus", "")
    if status in STOPNCII_DELETED_STATUSES:
        out.skip(n, f"StopNCII hash {status.lower()}")
        out.deleted.append(f"stopncii:{signal_type}:{value}")
        return None
    ref = f"stopncii:{','.join(sorted(str(c) for c in cases))}" if cases else f"{name}:{n}"
    return HashRecord(n, {canonical: value}, None, "", ref)
