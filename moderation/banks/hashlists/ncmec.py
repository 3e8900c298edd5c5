"""NCMEC hash-sharing entries: JSON Lines of ``NCMECEntryUpdate`` fields, or the XML
``queryResult`` document (read with DTDs refused)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final
from xml.parsers import expat

from moderation.banks.hashlists.records import (
    PROGRESS_EVERY,
    Dedup,
    HashRecord,
    ListSource,
    ParsedList,
    check_value,
    first_meaningful_line,
    json_lines,
    shorten,
    unsupported_type,
)

#: NCMEC fingerprint tags (``hash_api.py`` ``FingerprintType``, lowercased as in the XML) ->
#: canonical name. The others (``pdna``, ``netclean``, ``videntifier``, ``tmk_pdqf``,
#: ``ssvh_pdna``, ``ssvh_safer_hash``) are skipped as unsupported.
NCMEC_FINGERPRINTS: Final = {"md5": "md5", "sha1": "sha1", "pdq": "pdq"}

#: NCMEC XML entry elements (``hash_api.py`` ``NCMECEntryUpdate.from_xml``).
NCMEC_ENTRY_TAGS: Final = frozenset({"image", "video", "deletedImage", "deletedVideo"})


def parse_ncmec(source: ListSource, out: ParsedList, report: Callable[[int], None]) -> None:
    dedup = Dedup(out)
    if first_meaningful_line(source).startswith("<"):
        entries: Iterable[tuple[int, Any]] = _ncmec_xml_entries(source, out, report)
    else:
        entries = json_lines(source, out, report)
    for n, entry in entries:
        try:
            record = _ncmec_entry(out, n, entry)
        except ValueError as e:
            out.error(n, str(e))
            continue
        if record is not None:
            dedup.add(record)


def _ncmec_entry(out: ParsedList, n: int, entry: Any) -> HashRecord | None:
    """One NCMEC entry (dict of ``NCMECEntryUpdate`` fields) -> a record, or None if refused.

    Raises:
        ValueError: the entry is malformed.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"an NCMEC entry must be a JSON object, got {type(entry).__name__}")
    entry_id = entry.get("id")
    if isinstance(entry_id, int) and not isinstance(entry_id, bool):
        entry_id = str(entry_id)
    if not isinstance(entry_id, str) or not entry_id.strip():
        raise ValueError("NCMEC entry has no id")
    entry_id = entry_id.strip()
    entry_type = entry.get("entry_type", "image")
    if entry_type not in ("image", "video"):
        raise ValueError(
            f"NCMEC entry_type must be image or video, got {shorten(str(entry_type))!r}"
        )
    deleted = entry.get("deleted", False)
    if not isinstance(deleted, bool):
        raise ValueError(f"NCMEC deleted must be true or false, got {shorten(str(deleted))!r}")
    ref = f"ncmec:{entry_id}"
    if deleted:
        out.skip(n, f"deleted NCMEC entry {entry_id}")
        out.deleted.append(ref)
        return None
    fingerprints = entry.get("fingerprints") or {}
    if not isinstance(fingerprints, dict):
        raise ValueError("NCMEC fingerprints must be an object of type -> value")
    classification = entry.get("classification") or ""
    if not isinstance(classification, str):
        raise ValueError("NCMEC classification must be a string")
    signals: dict[str, str] = {}
    unsupported: list[str] = []
    for tag, value in fingerprints.items():
        canonical = NCMEC_FINGERPRINTS.get(str(tag).lower())
        if canonical is None:
            unsupported.append(str(tag))
            continue
        if not isinstance(value, str):
            raise ValueError(f"NCMEC {tag} fingerprint must be a string")
        signals[canonical] = check_value(canonical, value.strip())
    if unsupported:
        kept = " (its other fingerprints are kept)" if signals else ""
        out.skip(
            n, f"NCMEC entry {entry_id}: {unsupported_type(', '.join(sorted(unsupported)))}{kept}"
        )
    if not signals:
        if not unsupported:
            out.skip(n, f"NCMEC entry {entry_id} has no fingerprints")
        return None
    return HashRecord(n, signals, None, classification.strip(), ref)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


class _DtdRefused(ValueError):
    """The XML document declares a DTD or entities."""


def _refuse_dtd(*_args: object) -> None:
    raise _DtdRefused


def _parse_xml_without_dtd(text: str) -> ET.Element:
    """Parse XML, refusing DTDs as ``defusedxml`` does.

    ElementTree expands internal entities, so a DTD allows entity-expansion bombs; NCMEC's
    documents never declare one. A first pass with expat proves there is no DTD (and that the
    document is well-formed); only then does ElementTree build the tree.

    Raises:
        xml.parsers.expat.ExpatError: malformed XML (``lineno`` says where).
        _DtdRefused: a DOCTYPE or entity declaration.
    """
    checker = expat.ParserCreate()
    checker.StartDoctypeDeclHandler = _refuse_dtd
    checker.EntityDeclHandler = _refuse_dtd
    checker.Parse(text, True)
    # S314: the pass above refused DTDs, which is all defusedxml guards against here.
    return ET.fromstring(text)  # noqa: S314


def _ncmec_xml_entries(
    source: ListSource, out: ParsedList, report: Callable[[int], None]
) -> Iterator[tuple[int, Any]]:
    """Yield ``(record number, entry dict)`` for each entry of an NCMEC XML document."""
    text = source.read_text()
    try:
        root = _parse_xml_without_dtd(text)
    except expat.ExpatError as e:
        out.error(e.lineno, f"invalid XML: {e}")
        return
    except _DtdRefused:
        out.error(1, "XML with a DOCTYPE or entity declarations is refused")
        return
    n = 0
    for element in root.iter():
        local = _local(element.tag)
        if local not in NCMEC_ENTRY_TAGS:
            continue
        n += 1
        if n % PROGRESS_EVERY == 0:
            report(n)
        children = {_local(c.tag): c for c in element}
        member = children.get("member")
        fingerprints = children.get("fingerprints")
        classification = children.get("classification")
        id_element = children.get("id")
        yield (
            n,
            {
                "id": (id_element.text or "") if id_element is not None else "",
                "member_id": member.get("id") if member is not None else None,
                "entry_type": local.removeprefix("deleted").lower(),
                "deleted": local.startswith("deleted"),
                "classification": classification.text if classification is not None else None,
                "fingerprints": {
                    _local(x.tag): x.text
                    for x in (fingerprints if fingerprints is not None else ())
                    if x.text is not None
                },
            },
        )
    report(n)
