"""Writing hash lists back out for other services (ThreatExchange and plain formats)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Final, TextIO

from moderation.banks.hashlists.records import HEX_LENGTHS, HashRecord
from moderation.banks.hashlists.te import TE_CATEGORIES, TE_CSV_HEADER, TE_NAMES_OUT

#: Formats :func:`write_hash_list` writes.
WRITABLE_FORMATS: Final = ("threatexchange", "te-csv", "pdq", "md5", "sha1", "sha256")


def write_hash_list(records: Iterable[HashRecord], fmt: str, out: TextIO) -> int:
    """Write records in one of :data:`WRITABLE_FORMATS`; returns how many records were written.

    ``threatexchange`` and ``te-csv`` write one line per signal with TE's names
    (:data:`TE_NAMES_OUT`; a ``vpdq`` line carries the ``VPDQSignal`` JSON, as
    python-threatexchange's ``local_file`` collaboration writes it); ``te-csv`` splits the label
    back into category and tags (a label that does not start with a TE category is written as
    ``POSITIVE_CLASS`` with the label as tags). The plain formats write the records that carry that
    signal type and skip the others; ``pdq`` writes ``hex,quality`` when the quality is known. No
    comments are written: python-threatexchange's ``local_file`` reader would take them for signals.

    Raises:
        ValueError: ``fmt`` is not writable.
    """
    if fmt not in WRITABLE_FORMATS:
        raise ValueError(
            f"cannot write hash-list format {fmt!r}; expected one of {', '.join(WRITABLE_FORMATS)}"
        )
    written = 0
    if fmt in HEX_LENGTHS:
        for record in records:
            value = record.signals.get(fmt)
            if value is None:
                continue
            if fmt == "pdq" and record.pdq_quality is not None:
                out.write(f"{value},{record.pdq_quality}\n")
            else:
                out.write(f"{value}\n")
            written += 1
        return written
    writer = csv.writer(out, lineterminator="\n") if fmt == "te-csv" else None
    if writer is not None:
        writer.writerow(TE_CSV_HEADER)
    for record in records:
        if not record.signals:
            continue
        for signal_type, value in record.signals.items():
            te_name = TE_NAMES_OUT[signal_type]
            if writer is None:
                out.write(f"{te_name} {value}\n")
            else:
                category, _, tags = record.label.partition(" ")
                if category not in TE_CATEGORIES:
                    category, tags = "POSITIVE_CLASS", record.label
                writer.writerow((te_name, value, "", category, tags.strip()))
        written += 1
    return written
