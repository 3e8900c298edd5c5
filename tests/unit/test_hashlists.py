"""Hash-list file formats: every format parsed, detection, problems with line numbers, round
trips, and interop with python-threatexchange when it is installed."""

from __future__ import annotations

import gc
import io
import json
import random
from pathlib import Path

import pytest

from moderation.banks.hashlists import FORMATS, detect_format, parse_hash_list
from moderation.banks.hashlists.records import (
    MAX_PROBLEMS_KEPT,
    PDQ_QUALITY_THRESHOLD,
    PROGRESS_EVERY,
    SIGNAL_TYPES,
    HashRecord,
    LineProblem,
    ListSource,
)
from moderation.banks.hashlists.te import TE_SIGNAL_TYPES
from moderation.banks.hashlists.writer import WRITABLE_FORMATS, write_hash_list

# PdqSignal.get_examples() (ThreatExchange pdq/data/bridge-mods), VideoMD5Signal.get_examples(),
# VideoSHA256Signal's first example: real values, copied so the tests need no threatexchange.
PDQ_A = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
PDQ_B = "f8f8f0cee0f4a84f06370a2a038f63f0b36e26d596621e1d33e6b39c4e9c9b22"
MD5_A = "cab08b36195edb1a1231d2d09fa450e0"
MD5_B = "d41d8cd98f00b204e9800998ecf8427e"
SHA1_A = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1"
SHA256_A = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# `threatexchange dataset -P` (python-threatexchange 1.2.17, its sample collaboration).
TE_DATASET_P = f"""\
trend_query {{"and": [{{"or": ["basketball", "hoops"]}}]}} 'Sample Signals' INVESTIGATION_SEED
url_md5 95c3a3934d38b06959d4f6d5bfe48a79 'Sample Signals' INVESTIGATION_SEED
video_sha256 {SHA256_A} 'Sample Signals' INVESTIGATION_SEED
url https://developers.facebook.com/docs/threat-exchange/ 'Sample Signals' INVESTIGATION_SEED
pdq {PDQ_A} 'Sample Signals' INVESTIGATION_SEED
pdq {PDQ_B} 'Sample Signals' INVESTIGATION_SEED
video_md5 {MD5_A} 'Sample Signals' INVESTIGATION_SEED
"""

# `threatexchange dataset -P --csv` (same version and collaboration).
TE_DATASET_CSV = f"""\
signal_type,signal_str,collab,category,tags
raw_text,"We the People of the United States, in Order",Sample Signals,INVESTIGATION_SEED,
url_md5,95c3a3934d38b06959d4f6d5bfe48a79,Sample Signals,INVESTIGATION_SEED,
video_md5,{MD5_A},Sample Signals,INVESTIGATION_SEED,
video_md5,{MD5_B},Sample Signals,POSITIVE_CLASS,csam hma
pdq,{PDQ_A},Sample Signals,INVESTIGATION_SEED,
video_sha256,{SHA256_A},Sample Signals,INVESTIGATION_SEED,
"""

# python-threatexchange exchanges/clients/ncmec/tests/data.py ENTRIES_XML, with a PDQ added
# to image1.
NCMEC_XML = f"""\
<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<queryResult xmlns="https://hashsharing.ncmec.org/hashsharing/v2">
    <images count="2" maxTimestamp="2017-10-24T15:10:00Z">
        <image>
            <member id="42">Example Member</member>
            <timestamp>2017-10-24T15:00:00Z</timestamp>
            <id>image1</id>
            <classification>A1</classification>
            <fingerprints>
                <md5>A1A1A1A1A1A1A1A1A1A1A1A1A1A1A1A1</md5>
                <sha1>a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1</sha1>
                <pdna>a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1...</pdna>
                <pdq>{PDQ_A}</pdq>
            </fingerprints>
            <feedback lastUpdateTimestamp="2023-06-01T12:48:14Z">
                <affirmativeFeedback type="Md5" lastUpdateTimestamp="2023-06-01T12:48:14Z">
                    <members timestamp="2023-06-01T12:48:14Z">
                        <member id="42">Example Member</member>
                    </members>
                </affirmativeFeedback>
            </feedback>
        </image>
        <deletedImage>
            <member id="43">Example Member2</member>
            <id>image4</id>
            <timestamp>2017-10-24T15:10:00Z</timestamp>
        </deletedImage>
    </images>
    <videos count="2" maxTimestamp="2017-10-24T15:20:00Z">
        <video>
            <member id="42">Example Member</member>
            <timestamp>2017-10-24T15:00:00Z</timestamp>
            <id>video1</id>
            <fingerprints>
                <md5>b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1</md5>
                <sha1>b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1</sha1>
            </fingerprints>
        </video>
        <deletedVideo>
            <member id="42">Example Member</member>
            <id>video4</id>
            <timestamp>2017-10-24T15:20:00Z</timestamp>
        </deletedVideo>
    </videos>
    <paging>
        <next>/v2/entries?from=2017-10-20T00%3A00%3A00.000Z&amp;start=2001&amp;size=1000</next>
    </paging>
</queryResult>
"""


def ncmec_entry(entry_id: str, fingerprints: dict[str, str], **fields: object) -> str:
    """One JSON Lines line with ``NCMECEntryUpdate``'s fields."""
    entry: dict[str, object] = {
        "id": entry_id,
        "member_id": 42,
        "entry_type": "image",
        "deleted": False,
        "classification": "A1",
        "fingerprints": fingerprints,
    }
    entry.update(fields)
    return json.dumps(entry)


def stopncii_record(signal_type: str, value: str, **fields: object) -> dict[str, object]:
    """A ``StopNCIIHashRecord`` as the FetchHashes API returns it."""
    record: dict[str, object] = {
        "lastModtimestamp": 1700000000,
        "signalType": signal_type,
        "hashValue": value,
        "hashStatus": "Active",
        "caseNumbers": {"case-7": "Active"},
        "CSPFeedbacks": [],
    }
    record.update(fields)
    return record


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def values(parsed_records: list[HashRecord], signal_type: str) -> list[str]:
    return [r.signals[signal_type] for r in parsed_records if signal_type in r.signals]


# --- each format ------------------------------------------------------------------------


def test_threatexchange_dataset_output(tmp_path: Path) -> None:
    parsed = parse_hash_list(write(tmp_path, "te.txt", TE_DATASET_P), "threatexchange")
    assert parsed.errors == []
    assert [(r.line, r.signals) for r in parsed.records] == [
        (3, {"sha256": SHA256_A}),
        (5, {"pdq": PDQ_A}),
        (6, {"pdq": PDQ_B}),
        (7, {"md5": MD5_A}),
    ]
    assert parsed.records[1].label == "'Sample Signals' INVESTIGATION_SEED"
    assert parsed.records[1].ref == "te.txt:5"
    assert [(p.line, p.reason) for p in parsed.skipped] == [
        (1, "unsupported signal type 'trend_query'"),
        (2, "unsupported signal type 'url_md5'"),
        (4, "unsupported signal type 'url'"),
    ]


def test_threatexchange_local_file_lines(tmp_path: Path) -> None:
    text = f"# local_file collab\n\npdq {PDQ_A.upper()}\nvpdq {PDQ_B}\nsha1 {SHA1_A}\n"
    parsed = parse_hash_list(write(tmp_path, "local.txt", text), "threatexchange")
    assert [r.signals for r in parsed.records] == [{"pdq": PDQ_A}, {"sha1": SHA1_A}]
    assert parsed.skipped == [LineProblem(4, "unsupported signal type 'vpdq'")]


def test_te_csv(tmp_path: Path) -> None:
    parsed = parse_hash_list(write(tmp_path, "te.csv", TE_DATASET_CSV), "te-csv")
    assert parsed.errors == []
    assert [r.signals for r in parsed.records] == [
        {"md5": MD5_A},
        {"md5": MD5_B},
        {"pdq": PDQ_A},
        {"sha256": SHA256_A},
    ]
    assert [r.label for r in parsed.records[:2]] == [
        "INVESTIGATION_SEED",
        "POSITIVE_CLASS csam hma",
    ]
    assert parsed.records[2].line == 6
    assert [p.reason for p in parsed.skipped] == [
        "unsupported signal type 'raw_text'",
        "unsupported signal type 'url_md5'",
    ]


def test_te_csv_without_header_is_an_error(tmp_path: Path) -> None:
    parsed = parse_hash_list(
        write(tmp_path, "te.csv", f"pdq,{PDQ_A},c,POSITIVE_CLASS,\n"), "te-csv"
    )
    assert parsed.records == []
    assert parsed.errors[0].line == 1
    assert "signal_type, signal_str" in parsed.errors[0].reason


@pytest.mark.parametrize(
    ("fmt", "value"), [("pdq", PDQ_A), ("md5", MD5_A), ("sha1", SHA1_A), ("sha256", SHA256_A)]
)
def test_plain_lists(tmp_path: Path, fmt: str, value: str) -> None:
    text = f"# exported list\n\n{value.upper()}\n  {value[::-1]}  \r\n"
    parsed = parse_hash_list(write(tmp_path, f"{fmt}.txt", text), fmt)
    assert parsed.format == fmt
    assert parsed.errors == []
    assert [(r.line, r.signals, r.ref) for r in parsed.records] == [
        (3, {fmt: value}, f"{fmt}.txt:3"),
        (4, {fmt: value[::-1]}, f"{fmt}.txt:4"),
    ]


def test_pdq_lines_with_quality_and_filename(tmp_path: Path) -> None:
    text = f"{PDQ_A},100,photos/a.jpg\n{PDQ_B},{PDQ_QUALITY_THRESHOLD - 1},b.jpg\n"
    parsed = parse_hash_list(write(tmp_path, "pdq.csv", text), "pdq")
    assert [(r.signals["pdq"], r.pdq_quality, r.label) for r in parsed.records] == [
        (PDQ_A, 100, "photos/a.jpg")
    ]
    assert parsed.skipped == [LineProblem(2, "PDQ quality 49 is below 50")]
    assert parsed.errors == []


def test_pdq_quality_at_threshold_is_kept(tmp_path: Path) -> None:
    parsed = parse_hash_list(write(tmp_path, "p.txt", f"{PDQ_A},{PDQ_QUALITY_THRESHOLD}\n"), "pdq")
    assert [r.pdq_quality for r in parsed.records] == [PDQ_QUALITY_THRESHOLD]


def test_ncmec_xml(tmp_path: Path) -> None:
    parsed = parse_hash_list(write(tmp_path, "ncmec.xml", NCMEC_XML), "ncmec")
    assert parsed.errors == []
    assert [(r.line, r.ref, r.label, r.signals) for r in parsed.records] == [
        (
            1,
            "ncmec:image1",
            "A1",
            {"md5": "a1" * 16, "sha1": "a1" * 20, "pdq": PDQ_A},
        ),
        (3, "ncmec:video1", "", {"md5": "b1" * 16, "sha1": "b1" * 20}),
    ]
    assert parsed.deleted == ["ncmec:image4", "ncmec:video4"]
    reasons = [(p.line, p.reason) for p in parsed.skipped]
    assert reasons == [
        (1, "NCMEC entry image1: unsupported signal type 'pdna' (its other fingerprints are kept)"),
        (2, "deleted NCMEC entry image4"),
        (4, "deleted NCMEC entry video4"),
    ]


def test_ncmec_xml_with_a_dtd_is_refused(tmp_path: Path) -> None:
    bomb = '<?xml version="1.0"?><!DOCTYPE q [<!ENTITY a "aaaa">]><queryResult>&a;</queryResult>'
    parsed = parse_hash_list(write(tmp_path, "bomb.xml", bomb), "ncmec")
    assert parsed.records == []
    assert parsed.errors == [LineProblem(1, "XML with a DOCTYPE or entity declarations is refused")]


def test_ncmec_xml_malformed_names_its_line(tmp_path: Path) -> None:
    broken = NCMEC_XML.replace("</fingerprints>", "</fingerprint>", 1)
    parsed = parse_hash_list(write(tmp_path, "ncmec.xml", broken), "ncmec")
    assert parsed.records == []
    assert parsed.errors[0].line == broken.splitlines().index("            </fingerprint>") + 1
    assert parsed.errors[0].reason.startswith("invalid XML: mismatched tag")


def test_ncmec_json_lines(tmp_path: Path) -> None:
    lines = [
        ncmec_entry("e1", {"md5": MD5_A, "pdq": PDQ_A}, classification="A2"),
        ncmec_entry("e2", {"pdna": "x" * 20}),
        ncmec_entry("e3", {}, deleted=True, classification=None),
        "",
        ncmec_entry("e4", {"sha1": SHA1_A}, entry_type="video"),
    ]
    parsed = parse_hash_list(write(tmp_path, "ncmec.jsonl", "\n".join(lines) + "\n"), "ncmec")
    assert parsed.errors == []
    assert [(r.line, r.ref, r.label, r.signals) for r in parsed.records] == [
        (1, "ncmec:e1", "A2", {"md5": MD5_A, "pdq": PDQ_A}),
        (5, "ncmec:e4", "A1", {"sha1": SHA1_A}),
    ]
    assert parsed.skipped == [
        LineProblem(2, "NCMEC entry e2: unsupported signal type 'pdna'"),
        LineProblem(3, "deleted NCMEC entry e3"),
    ]
    assert parsed.deleted == ["ncmec:e3"]


def test_ncmec_bad_fingerprint_is_an_error(tmp_path: Path) -> None:
    lines = [ncmec_entry("ok", {"md5": MD5_A}), ncmec_entry("bad", {"pdq": PDQ_A[:-1]})]
    parsed = parse_hash_list(write(tmp_path, "n.jsonl", "\n".join(lines)), "ncmec")
    assert [str(p) for p in parsed.errors] == [
        "line 2: pdq value must be 64 hex characters, got 63"
    ]


def test_stopncii_document(tmp_path: Path) -> None:
    document = {
        "count": 4,
        "nextPageToken": None,
        "nextSetTimestamp": 1700000001,
        "hasMoreRecords": False,
        "hashRecords": [
            stopncii_record("ImagePDQ", PDQ_A.upper()),
            stopncii_record("VideoMD5", MD5_A, caseNumbers=[]),
            stopncii_record("VideoTMK", "abc"),
            stopncii_record("ImagePDQ", PDQ_B, hashStatus="Withdrawn"),
        ],
    }
    parsed = parse_hash_list(
        write(tmp_path, "fetch.json", json.dumps(document, indent=2)), "stopncii"
    )
    assert parsed.errors == []
    assert [(r.line, r.signals, r.ref) for r in parsed.records] == [
        (1, {"pdq": PDQ_A}, "stopncii:case-7"),
        (2, {"md5": MD5_A}, "fetch.json:2"),
    ]
    assert parsed.skipped == [
        LineProblem(3, "unsupported signal type 'VideoTMK'"),
        LineProblem(4, "StopNCII hash withdrawn"),
    ]
    assert parsed.deleted == [f"stopncii:ImagePDQ:{PDQ_B}"]


def test_stopncii_json_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps(stopncii_record("ImagePDQ", PDQ_A)),
        "# comment",
        json.dumps(stopncii_record("VideoMD5", MD5_A[:-2])),
        '{"signalType": "ImagePDQ", ',
    ]
    parsed = parse_hash_list(write(tmp_path, "s.jsonl", "\n".join(lines)), "stopncii")
    assert [r.signals for r in parsed.records] == [{"pdq": PDQ_A}]
    assert [p.line for p in parsed.errors] == [3, 4]
    assert parsed.errors[0].reason == "md5 value must be 32 hex characters, got 30"
    assert parsed.errors[1].reason.startswith("invalid JSON")


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
    path = write(tmp_path, "list", text)
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
        parse_hash_list(write(tmp_path, "h.txt", f"{PDQ_A}\n"))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "hello\n", '{"foo": 1}\n'])
def test_auto_refuses_what_it_cannot_tell(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="--format"):
        parse_hash_list(write(tmp_path, "h.txt", text))


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hash-list format 'vpdq'"):
        parse_hash_list(write(tmp_path, "h.txt", f"{PDQ_A}\n"), "vpdq")
    with pytest.raises(ValueError, match="cannot write hash-list format 'ncmec'"):
        write_hash_list([], "ncmec", io.StringIO())


# --- problems ---------------------------------------------------------------------------


def test_corrupted_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    good = [f"{random.Random(i).getrandbits(256):064x}" for i in range(20)]
    lines = list(good)
    lines[16] = good[16][:-1]  # line 17: a character lost
    lines[4] = good[4][:-1] + "g"  # line 5: not hex
    lines[9] = f"{good[9]},abc"  # line 10: bad quality
    parsed = parse_hash_list(write(tmp_path, "list.txt", "\n".join(lines) + "\n"), "pdq")
    assert [str(p) for p in parsed.errors] == [
        f"line 5: pdq value must be hex digits, got '{lines[4]}'",
        "line 10: PDQ quality must be an integer 0-100, got 'abc'",
        "line 17: pdq value must be 64 hex characters, got 63",
    ]
    assert len(parsed.records) == 17


@pytest.mark.parametrize("line", ["pdq", PDQ_A, f"{PDQ_A} pdq"])
def test_threatexchange_line_without_a_type_is_an_error(tmp_path: Path, line: str) -> None:
    parsed = parse_hash_list(write(tmp_path, "te.txt", f"pdq {PDQ_B}\n{line}\n"), "threatexchange")
    assert [p.line for p in parsed.errors] == [2]
    assert "expected 'signal_type signal'" in parsed.errors[0].reason


def test_wrong_length_for_the_declared_type(tmp_path: Path) -> None:
    parsed = parse_hash_list(write(tmp_path, "m.txt", f"{MD5_A}\n{SHA256_A}\n"), "md5")
    assert parsed.errors == [LineProblem(2, "md5 value must be 32 hex characters, got 64")]


def test_duplicates_first_line_wins(tmp_path: Path) -> None:
    text = f"{PDQ_A},90,first.jpg\n{PDQ_B}\n{PDQ_A.upper()},70,second.jpg\n{PDQ_A}\n"
    parsed = parse_hash_list(write(tmp_path, "p.txt", text), "pdq")
    assert [(r.line, r.label) for r in parsed.records] == [(1, "first.jpg"), (2, "")]
    assert parsed.duplicates == 2


def test_duplicates_across_multi_signal_records(tmp_path: Path) -> None:
    lines = [
        ncmec_entry("a", {"md5": MD5_A}),
        ncmec_entry("b", {"md5": MD5_A, "pdq": PDQ_A}),
        ncmec_entry("c", {"pdq": PDQ_A.upper()}),
    ]
    parsed = parse_hash_list(write(tmp_path, "n.jsonl", "\n".join(lines)), "ncmec")
    # Each signal value appears in exactly one record: the first that carried it.
    assert [(r.ref, r.signals) for r in parsed.records] == [
        ("ncmec:a", {"md5": MD5_A}),
        ("ncmec:b", {"pdq": PDQ_A}),
    ]
    assert parsed.duplicates == 1


def test_problem_lists_are_capped(tmp_path: Path) -> None:
    extra = 5
    text = "zz\n" * (MAX_PROBLEMS_KEPT + extra)
    parsed = parse_hash_list(write(tmp_path, "junk.txt", text), "md5")
    assert len(parsed.errors) == MAX_PROBLEMS_KEPT
    assert parsed.errors_not_kept == extra


def test_progress_is_reported(tmp_path: Path) -> None:
    rng = random.Random(3)
    count = PROGRESS_EVERY * 2 + 7
    text = "".join(f"{rng.getrandbits(128):032x}\n" for _ in range(count))
    seen: list[int] = []
    parsed = parse_hash_list(write(tmp_path, "m.txt", text), "md5", progress=seen.append)
    assert seen == [PROGRESS_EVERY, 2 * PROGRESS_EVERY, count]
    assert len(parsed.records) + parsed.duplicates == count


@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collector_state_is_restored(tmp_path: Path, enabled: bool) -> None:
    path = write(tmp_path, "m.txt", f"{MD5_A}\n")
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        parse_hash_list(path, "md5")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_undecodable_bytes_fail_their_line(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_bytes(b"\xef\xbb\xbf" + MD5_A.encode() + b"\n" + b"\xff" * 32 + b"\n")
    parsed = parse_hash_list(path, "md5")
    assert [r.signals["md5"] for r in parsed.records] == [MD5_A]
    assert [p.line for p in parsed.errors] == [2]


# --- writing ----------------------------------------------------------------------------


def sample_records() -> list[HashRecord]:
    return [
        HashRecord(1, {"pdq": PDQ_A}, 93, "POSITIVE_CLASS csam", "x:1"),
        HashRecord(2, {"md5": MD5_A, "sha1": SHA1_A, "pdq": PDQ_B}, None, "A1", "ncmec:e1"),
        HashRecord(3, {"sha256": SHA256_A}, None, "", "x:3"),
        HashRecord(4, {"md5": MD5_B}, None, "INVESTIGATION_SEED", "x:4"),
    ]


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    records = sample_records()
    buffer = io.StringIO()
    written = write_hash_list(records, fmt, buffer)
    path = write(tmp_path, f"out.{fmt}", buffer.getvalue())
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
    assert parse_hash_list(write(tmp_path, "te.txt", buffer.getvalue())).format == "threatexchange"


def test_formats_listed() -> None:
    assert set(WRITABLE_FORMATS) <= set(FORMATS)
    assert set(TE_SIGNAL_TYPES.values()) == set(SIGNAL_TYPES)


# --- interop with python-threatexchange -------------------------------------------------


def te() -> object:
    return pytest.importorskip(
        "threatexchange",
        reason="python-threatexchange is not installed in this venv (pyproject adds it later)",
    )


def test_signal_names_match_threatexchange() -> None:
    te()
    from threatexchange.signal_type.md5 import VideoMD5Signal
    from threatexchange.signal_type.pdq.signal import PdqSignal
    from threatexchange.signal_type.sha256 import VideoSHA256Signal

    assert PdqSignal.QUALITY_THRESHOLD == PDQ_QUALITY_THRESHOLD
    for signal_cls, canonical in (
        (PdqSignal, "pdq"),
        (VideoMD5Signal, "md5"),
        (VideoSHA256Signal, "sha256"),
    ):
        assert TE_SIGNAL_TYPES[signal_cls.get_name()] == canonical


def test_values_agree_with_threatexchange_validation(tmp_path: Path) -> None:
    te()
    from threatexchange.signal_type.md5 import VideoMD5Signal
    from threatexchange.signal_type.pdq.signal import PdqSignal
    from threatexchange.signal_type.sha256 import VideoSHA256Signal

    classes = (PdqSignal, VideoMD5Signal, VideoSHA256Signal)
    lines = [f"{c.get_name()} {example}" for c in classes for example in c.get_examples()]
    lines += [f"{c.get_name()} {c.get_random_signal()}" for c in classes for _ in range(20)]
    parsed = parse_hash_list(write(tmp_path, "te.txt", "\n".join(lines)), "threatexchange")
    assert parsed.errors == []
    by_name = {c.get_name(): c for c in classes}
    for record in parsed.records:
        te_name, value = lines[record.line - 1].split()
        assert record.signals == {
            TE_SIGNAL_TYPES[te_name]: by_name[te_name].validate_signal_str(value)
        }
    # And what TE refuses, we refuse.
    for bad in (PDQ_A[:-1], PDQ_A[:-1] + "x", ""):
        with pytest.raises(ValueError):
            PdqSignal.validate_signal_str(bad)
        bad_parse = parse_hash_list(write(tmp_path, "bad.txt", f"{bad or ','}\n"), "pdq")
        assert bad_parse.errors


def test_threatexchange_reads_what_we_write(tmp_path: Path) -> None:
    te()
    from threatexchange.exchanges.impl.file_api import (
        FileCollaborationConfig,
        LocalFileSignalExchangeAPI,
    )

    path = tmp_path / "export.txt"
    with path.open("w") as out:
        write_hash_list(sample_records(), "threatexchange", out)
    api = LocalFileSignalExchangeAPI.for_collab(
        FileCollaborationConfig(filename=str(path), name="export")
    )
    fetched = {key for delta in api.fetch_iter([], None) for key in delta.updates}
    assert fetched == {
        ("pdq", PDQ_A),
        ("video_md5", MD5_A),
        ("sha1", SHA1_A),
        ("pdq", PDQ_B),
        ("video_sha256", SHA256_A),
        ("video_md5", MD5_B),
    }


def test_ncmec_xml_agrees_with_threatexchange_client(tmp_path: Path) -> None:
    te()
    import xml.etree.ElementTree as ET

    from threatexchange.exchanges.clients.ncmec.hash_api import GetEntriesResponse, _XMLWrapper

    # NCMECHashAPI strips the namespace before parsing; do the same for its parser.
    plain = NCMEC_XML.replace(' xmlns="https://hashsharing.ncmec.org/hashsharing/v2"', "")
    theirs = GetEntriesResponse.from_xml(_XMLWrapper(ET.fromstring(plain)), 0).updates
    parsed = parse_hash_list(write(tmp_path, "ncmec.xml", NCMEC_XML), "ncmec")
    assert [f"ncmec:{u.id}" for u in theirs if u.deleted] == parsed.deleted
    ours = {r.ref: r.signals for r in parsed.records}
    for update in theirs:
        if update.deleted:
            continue
        supported = {k: v.lower() for k, v in update.fingerprints.items() if k in SIGNAL_TYPES}
        assert ours[f"ncmec:{update.id}"] == supported
