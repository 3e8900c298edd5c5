"""Hash-list file formats: interop with python-threatexchange when it is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.banks.hashlists import parse_hash_list
from moderation.banks.hashlists.records import (
    PDQ_QUALITY_THRESHOLD,
    SIGNAL_TYPES,
)
from moderation.banks.hashlists.te import TE_SIGNAL_TYPES
from moderation.banks.hashlists.writer import write_hash_list
from tests.unit.conftest import (
    MD5_A,
    MD5_B,
    NCMEC_XML,
    PDQ_A,
    PDQ_B,
    SHA1_A,
    SHA256_A,
    sample_records,
    write_list,
)

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
    parsed = parse_hash_list(write_list(tmp_path, "te.txt", "\n".join(lines)), "threatexchange")
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
        bad_parse = parse_hash_list(write_list(tmp_path, "bad.txt", f"{bad or ','}\n"), "pdq")
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
    parsed = parse_hash_list(write_list(tmp_path, "ncmec.xml", NCMEC_XML), "ncmec")
    assert [f"ncmec:{u.id}" for u in theirs if u.deleted] == parsed.deleted
    ours = {r.ref: r.signals for r in parsed.records}
    for update in theirs:
        if update.deleted:
            continue
        supported = {k: v.lower() for k, v in update.fingerprints.items() if k in SIGNAL_TYPES}
        assert ours[f"ncmec:{update.id}"] == supported
