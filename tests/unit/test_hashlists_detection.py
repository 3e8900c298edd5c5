"""Hash-list file formats: detection of the format, from a file or from bytes in memory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from moderation.banks.hashlists import detect_format, parse_hash_list
from moderation.banks.hashlists.records import (
    LineProblem,
    ListSource,
)
from moderation.banks.hashlists.writer import write_hash_list
from tests.unit.conftest import (
    MD5_A,
    NCMEC_XML,
    PDQ_A,
    PDQ_B,
    SHA1_A,
    TE_DATASET_CSV,
    TE_DATASET_P,
    ncmec_entry,
    stopncii_record,
    write_list,
)

# --- detection --------------------------------------------------------------------------


DETECTION_CASES = [
    (TE_DATASET_P, "threatexchange"),
    (f"# header\npdq {PDQ_A}\n", "threatexchange"),
    (TE_DATASET_CSV, "te-csv"),
    (f"{PDQ_A},87\n", "pdq"),
    (f"\n# md5s\n{MD5_A}\n", "md5"),
    (f"{SHA1_A}\n", "sha1"),
    (NCMEC_XML, "ncmec"),
    (ncmec_entry("e1", {"md5": MD5_A}) + "\n", "ncmec"),
    (json.dumps({"hashRecords": [stopncii_record("ImagePDQ", PDQ_A)]}, indent=1), "stopncii"),
    (json.dumps(stopncii_record("ImagePDQ", PDQ_A)) + "\n", "stopncii"),
]


@pytest.mark.parametrize(("text", "expected"), DETECTION_CASES)
def test_auto_detection(tmp_path: Path, text: str, expected: str) -> None:
    path = write_list(tmp_path, "list", text)
    assert detect_format(path) == expected
    parsed = parse_hash_list(path)
    assert parsed.format == expected
    assert parsed.records
    assert parsed.errors == []


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
@pytest.mark.parametrize(("text", "expected"), DETECTION_CASES)
def test_a_list_in_memory_parses_as_its_file(
    tmp_path: Path, text: str, expected: str, line_end: str
) -> None:
    data = ("\ufeff" + text.replace("\n", line_end)).encode()
    path = tmp_path / "list.txt"
    path.write_bytes(data)
    in_memory = ListSource.from_bytes("list.txt", data)
    assert detect_format(in_memory) == detect_format(path) == expected
    from_memory = parse_hash_list(in_memory)
    assert from_memory == parse_hash_list(path)
    assert from_memory.records and from_memory.errors == []


def test_a_list_in_memory_reports_problems_by_its_name() -> None:
    source = ListSource.from_bytes("upload.txt", f"{PDQ_A},90\n{PDQ_B[:-1]}\n".encode())
    parsed = parse_hash_list(source, "pdq")
    assert [r.ref for r in parsed.records] == ["upload.txt:1"]
    assert parsed.errors == [LineProblem(2, "pdq value must be 64 hex characters, got 63")]
    assert PDQ_A not in repr(source) and PDQ_A not in str(source)
    with pytest.raises(ValueError, match="64 hex digits may be PDQ or SHA-256"):
        detect_format(ListSource.from_bytes("h.txt", f"{PDQ_A}\n".encode()))


def test_a_list_source_holds_a_path_or_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either a path or bytes"):
        ListSource("x")
    with pytest.raises(ValueError, match="either a path or bytes"):
        ListSource("x", path=tmp_path / "x", data=b"")
    path = tmp_path / "list.v2.txt"
    assert ListSource.of(path) == ListSource("list.v2.txt", path=path)
    assert (ListSource.of(path).stem, str(ListSource.of(path))) == ("list.v2", str(path))


def test_auto_refuses_64_hex_lines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"PDQ or SHA-256.*--format"):
        parse_hash_list(write_list(tmp_path, "h.txt", f"{PDQ_A}\n"))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "hello\n", '{"foo": 1}\n'])
def test_auto_refuses_what_it_cannot_tell(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="--format"):
        parse_hash_list(write_list(tmp_path, "h.txt", text))


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hash-list format 'vpdq'"):
        parse_hash_list(write_list(tmp_path, "h.txt", f"{PDQ_A}\n"), "vpdq")
    with pytest.raises(ValueError, match="cannot write hash-list format 'ncmec'"):
        write_hash_list([], "ncmec", io.StringIO())
