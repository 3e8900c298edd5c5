"""Hash-list file formats: writing, and round trips through every writable format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from moderation.banks.hashlists import FORMATS, parse_hash_list
from moderation.banks.hashlists.records import (
    LIST_SIGNAL_TYPES,
    SIGNAL_TYPES,
    HashRecord,
)
from moderation.banks.hashlists.te import TE_SIGNAL_TYPES
from moderation.banks.hashlists.writer import WRITABLE_FORMATS, write_hash_list
from tests.unit.conftest import (
    MD5_A,
    PDQ_A,
    sample_records,
    write_list,
)

# --- writing ----------------------------------------------------------------------------


def values(parsed_records: list[HashRecord], signal_type: str) -> list[str]:
    return [r.signals[signal_type] for r in parsed_records if signal_type in r.signals]


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    records = sample_records()
    buffer = io.StringIO()
    written = write_hash_list(records, fmt, buffer)
    path = write_list(tmp_path, f"out.{fmt}", buffer.getvalue())
    parsed = parse_hash_list(path, fmt)
    assert parsed.errors == []
    assert parsed.skipped == []
    if fmt in SIGNAL_TYPES:
        expected = [r.signals[fmt] for r in records if fmt in r.signals]
        assert written == len(expected)
        assert values(parsed.records, fmt) == expected
        if fmt == "pdq":
            assert [r.pdq_quality for r in parsed.records] == [93, None]
    else:
        assert written == len(records)
        # One line per signal: the multi-signal record comes back as one record per signal.
        got = [(t, v) for r in parsed.records for t, v in r.signals.items()]
        assert got == [(t, v) for r in records for t, v in r.signals.items()]
    if fmt == "te-csv":
        assert [r.label for r in parsed.records] == [
            "POSITIVE_CLASS csam",
            "POSITIVE_CLASS A1",
            "POSITIVE_CLASS A1",
            "POSITIVE_CLASS A1",
            "POSITIVE_CLASS",
            "INVESTIGATION_SEED",
        ]


def test_written_threatexchange_file_is_auto_detected(tmp_path: Path) -> None:
    buffer = io.StringIO()
    write_hash_list(sample_records(), "threatexchange", buffer)
    assert buffer.getvalue().splitlines()[:2] == [f"pdq {PDQ_A}", f"video_md5 {MD5_A}"]
    assert "#" not in buffer.getvalue()  # TE's local_file reader would take a comment for a signal
    assert (
        parse_hash_list(write_list(tmp_path, "te.txt", buffer.getvalue())).format
        == "threatexchange"
    )


def test_formats_listed() -> None:
    assert set(WRITABLE_FORMATS) <= set(FORMATS)
    assert set(TE_SIGNAL_TYPES.values()) == set(LIST_SIGNAL_TYPES)
