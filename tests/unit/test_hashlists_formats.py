"""Hash-list file formats: every format parsed (ThreatExchange, plain lists, PDQ, NCMEC,
StopNCII).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moderation.banks.hashlists import parse_hash_list
from moderation.banks.hashlists.records import (
    PDQ_QUALITY_THRESHOLD,
    LineProblem,
)
from tests.unit.conftest import (
    MD5_A,
    MD5_B,
    NCMEC_XML,
    PDQ_A,
    PDQ_B,
    SHA1_A,
    SHA256_A,
    TE_DATASET_CSV,
    TE_DATASET_P,
    ncmec_entry,
    stopncii_record,
    write_list,
)

# --- each format ------------------------------------------------------------------------


def test_threatexchange_dataset_output(tmp_path: Path) -> None:
    parsed = parse_hash_list(write_list(tmp_path, "te.txt", TE_DATASET_P), "threatexchange")
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
    text = f"# local_file collab\n\npdq {PDQ_A.upper()}\nurl example.com/a b\nsha1 {SHA1_A}\n"
    parsed = parse_hash_list(write_list(tmp_path, "local.txt", text), "threatexchange")
    assert [r.signals for r in parsed.records] == [{"pdq": PDQ_A}, {"sha1": SHA1_A}]
    assert parsed.skipped == [LineProblem(4, "unsupported signal type 'url'")]


def test_threatexchange_vpdq_lines(tmp_path: Path) -> None:
    # A VPDQSignal string is JSON with spaces: the whole rest of the line is the signal.
    signal = f'["{PDQ_A},100,0.0", "{PDQ_B},90,1.0"]'
    text = f"vpdq {signal}\nvpdq {PDQ_B}\n"
    parsed = parse_hash_list(write_list(tmp_path, "local.txt", text), "threatexchange")
    assert [r.signals for r in parsed.records] == [{"vpdq": signal}]
    assert [e.line for e in parsed.errors] == [2]
    assert "a vPDQ signal is a JSON list" in parsed.errors[0].reason


def test_te_csv(tmp_path: Path) -> None:
    parsed = parse_hash_list(write_list(tmp_path, "te.csv", TE_DATASET_CSV), "te-csv")
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
        write_list(tmp_path, "te.csv", f"pdq,{PDQ_A},c,POSITIVE_CLASS,\n"), "te-csv"
    )
    assert parsed.records == []
    assert parsed.errors[0].line == 1
    assert "signal_type, signal_str" in parsed.errors[0].reason


@pytest.mark.parametrize(
    ("fmt", "value"), [("pdq", PDQ_A), ("md5", MD5_A), ("sha1", SHA1_A), ("sha256", SHA256_A)]
)
def test_plain_lists(tmp_path: Path, fmt: str, value: str) -> None:
    text = f"# exported list\n\n{value.upper()}\n  {value[::-1]}  \r\n"
    parsed = parse_hash_list(write_list(tmp_path, f"{fmt}.txt", text), fmt)
    assert parsed.format == fmt
    assert parsed.errors == []
    assert [(r.line, r.signals, r.ref) for r in parsed.records] == [
        (3, {fmt: value}, f"{fmt}.txt:3"),
        (4, {fmt: value[::-1]}, f"{fmt}.txt:4"),
    ]


def test_pdq_lines_with_quality_and_filename(tmp_path: Path) -> None:
    text = f"{PDQ_A},100,photos/a.jpg\n{PDQ_B},{PDQ_QUALITY_THRESHOLD - 1},b.jpg\n"
    parsed = parse_hash_list(write_list(tmp_path, "pdq.csv", text), "pdq")
    assert [(r.signals["pdq"], r.pdq_quality, r.label) for r in parsed.records] == [
        (PDQ_A, 100, "photos/a.jpg")
    ]
    assert parsed.skipped == [LineProblem(2, "PDQ quality 49 is below 50")]
    assert parsed.errors == []


def test_pdq_quality_at_threshold_is_kept(tmp_path: Path) -> None:
    parsed = parse_hash_list(
        write_list(tmp_path, "p.txt", f"{PDQ_A},{PDQ_QUALITY_THRESHOLD}\n"), "pdq"
    )
    assert [r.pdq_quality for r in parsed.records] == [PDQ_QUALITY_THRESHOLD]


def test_ncmec_xml(tmp_path: Path) -> None:
    parsed = parse_hash_list(write_list(tmp_path, "ncmec.xml", NCMEC_XML), "ncmec")
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
    parsed = parse_hash_list(write_list(tmp_path, "bomb.xml", bomb), "ncmec")
    assert parsed.records == []
    assert parsed.errors == [LineProblem(1, "XML with a DOCTYPE or entity declarations is refused")]


def test_ncmec_xml_malformed_names_its_line(tmp_path: Path) -> None:
    broken = NCMEC_XML.replace("</fingerprints>", "</fingerprint>", 1)
    parsed = parse_hash_list(write_list(tmp_path, "ncmec.xml", broken), "ncmec")
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
    parsed = parse_hash_list(write_list(tmp_path, "ncmec.jsonl", "\n".join(lines) + "\n"), "ncmec")
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
    parsed = parse_hash_list(write_list(tmp_path, "n.jsonl", "\n".join(lines)), "ncmec")
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
        write_list(tmp_path, "fetch.json", json.dumps(document, indent=2)), "stopncii"
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
    parsed = parse_hash_list(write_list(tmp_path, "s.jsonl", "\n".join(lines)), "stopncii")
    assert [r.signals for r in parsed.records] == [{"pdq": PDQ_A}]
    assert [p.line for p in parsed.errors] == [3, 4]
    assert parsed.errors[0].reason == "md5 value must be 32 hex characters, got 30"
    assert parsed.errors[1].reason.startswith("invalid JSON")
