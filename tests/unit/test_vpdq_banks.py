"""vPDQ video signatures in banks: a hash list written by python-threatexchange's own code is
imported, video uploads are screened against it with threatexchange's match rule, and the bank
exports it back byte for byte. Clips are encoded in the tests from scikit-image's photos."""

from __future__ import annotations

import importlib
import importlib.machinery
import io
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from moderation.banks.hash_export import export_hashes
from moderation.banks.hash_import import HashListError, import_hash_list
from moderation.banks.records import create_bank, get_bank
from moderation.banks.sealed_fields import entry_labels
from moderation.banks.vpdq_scan import VpdqScan
from moderation.matching.candidates import Scope
from moderation.matching.policy import PolicyError, load_policy, parse_policy
from moderation.matching.video import decode_video_upload
from moderation.media.video import VideoLimits
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.signals.vpdq import VpdqFeature, match_features, to_signal_str
from moderation.storage.db import transaction
from moderation.storage.models import Entry, Match
from tests.video_clips import clip, photo, recoloured

LISTED = (("astronaut", 2.0), ("coffee", 2.0))


def features_of(data: bytes) -> list[VpdqFeature]:
    return list(decode_video_upload(data, VideoLimits()).vpdq)


def scenes(*names: str, kind: str = "mp4", edit: Any = None) -> bytes:
    """A clip of 2 s per named photo (``edit`` applied to each)."""
    return clip([((edit or (lambda im: im))(photo(name)), 2.0) for name in names], kind)


@pytest.fixture(scope="module")
def signatures() -> dict[str, list[VpdqFeature]]:
    """vPDQ of the listed clip, its edited re-encode, a clip sharing one scene, an unrelated
    clip, and a clip that is the listed one's second scene alone."""
    return {
        "listed": features_of(scenes("astronaut", "coffee")),
        "edited": features_of(scenes("astronaut", "coffee", kind="webm", edit=recoloured)),
        "half": features_of(scenes("astronaut", "rocket", kind="mov")),
        "unrelated": features_of(scenes("rocket", "chelsea")),
        "excerpt": features_of(scenes("coffee")),
    }


def te_signal(util: types.ModuleType, features: list[VpdqFeature]) -> str:
    """The ``VPDQSignal`` string python-threatexchange writes for ``features``."""
    compact = [util.VpdqCompactFeature(f.pdq_hex, f.quality, f.timestamp) for f in features]
    signal: str = util.vpdq_to_json(compact)
    return signal


def te_local_file(path: Path, signals: list[tuple[type, str]]) -> None:
    """A local_file collaboration list: ``SignalType.get_name()`` and the signal per line, the
    line ``LocalFileSignalExchangeAPI.report_opinion`` appends (which cannot run itself in
    threatexchange 1.2.17: it opens the file with mode ``"wta"``, which Python refuses)."""
    path.write_text("".join(f"{t.get_name()} {signal}\n" for t, signal in signals))  # type: ignore[attr-defined]


def te_read_local_file(path: Path) -> set[tuple[str, str]]:
    """The (signal type, signal) pairs python-threatexchange's local_file reader finds."""
    file_api = importlib.import_module("threatexchange.exchanges.impl.file_api")
    api = file_api.LocalFileSignalExchangeAPI(
        file_api.FileCollaborationConfig(name="videos", api="local_file", filename=str(path))
    )
    [delta] = api.fetch_iter([], None)
    return set(delta.updates)


# --- matching: the same numbers as python-threatexchange ------------------------------------


def test_scan_matches_as_threatexchange_index_and_brute_matcher(
    threatexchange_vpdq: types.ModuleType, signatures: dict[str, list[VpdqFeature]]
) -> None:
    index_module = importlib.import_module("threatexchange.extensions.vpdq.vpdq_index")
    util = importlib.import_module("threatexchange.extensions.vpdq.vpdq_util")
    banked = {11: "listed", 12: "unrelated", 13: "excerpt"}
    owners = np.array([eid for eid, n in banked.items() for _ in signatures[n]], np.int64)
    frames = [f for n in banked.values() for f in signatures[n]]
    scan = VpdqScan(
        owners,
        np.array([list(bytes.fromhex(f.pdq_hex)) for f in frames], np.uint8),
        np.array([f.quality for f in frames], np.uint8),
    )
    # threatexchange's index with no thresholds returns every entry sharing a matching frame.
    theirs_index = index_module.VPDQIndex.build(
        [(te_signal(util, signatures[n]), eid) for eid, n in banked.items()],
        query_match_threshold_pct=0.0,
    )
    for query in signatures.values():
        ours = {eid: m for eid, m in scan.search(query)}
        theirs = {
            m.metadata: (
                m.similarity_info.query_match_percent,
                m.similarity_info.compared_match_percent,
            )
            for m in theirs_index.query(te_signal(util, query))
        }
        assert {
            eid: (m.query_match_percent, m.compared_match_percent) for eid, m in ours.items()
        } == theirs
        for eid, name in banked.items():
            brute = match_features(query, signatures[name])
            assert (ours[eid] if eid in ours else brute.__class__(0.0, 0.0)) == brute
    found = dict(scan.search(signatures["edited"]))
    assert found[11].query_match_percent == 100.0 and 12 not in found
    half = dict(scan.search(signatures["half"]))[11]
    assert (half.query_match_percent, half.compared_match_percent) == (50.0, 50.0)


def test_scan_skips_entries_without_usable_frames() -> None:
    low = np.array([[1] * 32, [2] * 32], np.uint8)
    scan = VpdqScan(np.array([5, 5], np.int64), low, np.array([10, 49], np.uint8))
    assert len(scan) == 0
    assert scan.search([VpdqFeature(0, 100, "01" * 32, 0.0)]) == []


# --- a python-threatexchange list through a bank ---------------------------------------------


@pytest.fixture
def video_bank(
    runtime: Runtime,
    tmp_path: Path,
    threatexchange_vpdq: types.ModuleType,
    signatures: dict[str, list[VpdqFeature]],
) -> Path:
    """Bank ``videos`` filled from a local_file list python-threatexchange wrote: the listed
    clip's vPDQ and one photo's PDQ. Returns the list."""
    util = importlib.import_module("threatexchange.extensions.vpdq.vpdq_util")
    pdq_signal = importlib.import_module("threatexchange.signal_type.pdq.signal").PdqSignal
    listing = tmp_path / "videos.txt"
    photo_pdq = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
    te_local_file(
        listing,
        [
            (pdq_signal, photo_pdq),
            (threatexchange_vpdq.VPDQSignal, te_signal(util, signatures["listed"])),
        ],
    )
    with transaction(runtime.sessions) as session:
        create_bank(session, "videos")
    report = import_hash_list(runtime, "videos", listing, actor="test")
    assert (report.format, report.added, report.skipped) == ("threatexchange", 2, [])
    # python-threatexchange's own reader sees the two signals.
    assert {kind for kind, _ in te_read_local_file(listing)} == {"pdq", "vpdq"}
    return listing


def test_edited_copy_blocks_partial_copy_reviews_unrelated_allowed(
    runtime: Runtime, video_bank: Path, tmp_path: Path
) -> None:
    screener = runtime.screener()
    edited = scenes("astronaut", "coffee", kind="webm", edit=recoloured)
    half = scenes("astronaut", "rocket", kind="mov")
    unrelated = scenes("rocket", "chelsea")
    blocked, reviewed, allowed = screener.screen_bytes([edited, half, unrelated])
    assert blocked.decision == "block", blocked.explanation
    top = blocked.matches[0]
    assert top.entry.bank_name == "videos" and "vpdq" in top.signals
    assert top.to_json()["vpdq"] == {"query_match_percent": 100.0, "compared_match_percent": 100.0}
    assert top.timestamp_s is None and "timestamp_s" not in top.to_json()
    assert blocked.explanation["thresholds"]["block_vpdq_percent"] == 80.0
    assert reviewed.decision == "review", reviewed.explanation
    assert reviewed.matches[0].vpdq is not None
    assert reviewed.matches[0].vpdq.query_match_percent == 50.0
    assert (allowed.decision, allowed.matches) == ("allow", ())
    # Another tenant's bank never matches.
    [scoped] = screener.screen_bytes([edited], [Scope(banks=frozenset({-1}))])
    assert scoped.decision == "allow"
    # The recorded match row carries the percentages.
    path = tmp_path / "copy.webm"
    path.write_bytes(edited)
    rows: list[dict[str, Any]] = []
    screen_paths(runtime, [path], on_result=rows.append)
    assert rows[0]["decision"] == "block"
    with runtime.sessions() as session:
        match = session.scalars(select(Match).order_by(Match.id.desc())).first()
        assert match is not None and match.signals["vpdq"]["query_match_percent"] == 100.0
        assert "vpdq" in match.signals["agreed"]


def test_disabled_category_thresholds_leave_vpdq_unused(runtime: Runtime, video_bank: Path) -> None:
    screener = runtime.screener()
    document = load_policy(runtime.settings.policies_dir, "default").model_dump()
    document["categories"]["default"] |= {"block_vpdq_percent": None, "review_vpdq_percent": None}
    screener.policy = parse_policy(document, source="test")
    [result] = screener.screen_bytes([scenes("astronaut", "coffee", kind="webm", edit=recoloured)])
    assert result.decision == "allow"
    assert result.explanation["candidates"][0]["vpdq"]["query_match_percent"] == 100.0


def test_export_writes_the_list_back_identically(
    runtime: Runtime, video_bank: Path, tmp_path: Path
) -> None:
    out = io.StringIO()
    assert export_hashes(runtime, "videos", out, fmt="threatexchange", actor="test") == 2
    assert sorted(out.getvalue().splitlines()) == sorted(video_bank.read_text().splitlines())
    exported = tmp_path / "exported.txt"
    exported.write_text(out.getvalue())
    assert te_read_local_file(exported) == te_read_local_file(video_bank)
    # te-csv too, and a re-import merges everything.
    csv_out = io.StringIO()
    export_hashes(runtime, "videos", csv_out, fmt="te-csv", actor="test")
    (tmp_path / "exported.csv").write_text(csv_out.getvalue())
    again = import_hash_list(runtime, "videos", tmp_path / "exported.csv", actor="test")
    assert (again.added, again.merged) == (0, 2)
    # Plain PDQ lists cannot carry a video signature: only the photo's digest goes out.
    pdq_out = io.StringIO()
    assert export_hashes(runtime, "videos", pdq_out, fmt="pdq", actor="test") == 1


def test_entries_are_sealed_like_others(runtime: Runtime, video_bank: Path) -> None:
    with runtime.sessions() as session:
        bank = get_bank(session, "videos")
        entries = session.scalars(select(Entry).where(Entry.bank_id == bank.id)).all()
        assert len(entries) == 2 and all(e.origin == "hash_list" for e in entries)
        # Label and ref are sealed in the row, readable with the bank's key only.
        assert all(e.label_sealed and b"videos" not in e.label_sealed for e in entries)
        labels = entry_labels(session, runtime.keyring, [e.id for e in entries])
        assert set(labels.values()) == {"videos"}


def test_malformed_and_unusable_vpdq_lines(runtime: Runtime, tmp_path: Path) -> None:
    with transaction(runtime.sessions) as session:
        create_bank(session, "videos")
    bad = tmp_path / "bad.txt"
    bad.write_text('vpdq ["zz,100,0.0"]\n')
    with pytest.raises(HashListError, match="line 1: invalid vPDQ feature 0"):
        import_hash_list(runtime, "videos", bad, actor="test")
    dark = tmp_path / "dark.txt"
    dark.write_text("vpdq " + to_signal_str([VpdqFeature(0, 20, "ab" * 32, 0.0)]) + "\n")
    report = import_hash_list(runtime, "videos", dark, actor="test")
    assert report.added == 0
    assert [s.reason for s in report.skipped] == ["vpdq signal has no frame of quality >= 50"]


def test_policy_refuses_review_above_block() -> None:
    document = {
        "name": "p",
        "categories": {
            "default": {
                "block_cosine": 0.8,
                "review_cosine": 0.7,
                "block_vpdq_percent": 60.0,
                "review_vpdq_percent": 70.0,
            }
        },
    }
    with pytest.raises(PolicyError, match="review_vpdq_percent must be <= block_vpdq_percent"):
        parse_policy(document, source="test")


def test_threatexchange_cli_matches_our_signatures_against_our_export(
    runtime: Runtime,
    video_bank: Path,
    tmp_path: Path,
    signatures: dict[str, list[VpdqFeature]],
) -> None:
    """python-threatexchange's CLI, offline: our export as its local_file collaboration, then
    ``match --hashes video`` of the signatures we computed. Its vPDQ extension imports the
    ``vpdq`` C extension (FFmpeg bindings) only to hash files, so a stub stands in for it when
    it is not installed; the CLI's own ``hash video`` needs the real one and is not run."""
    cli = Path(sys.executable).with_name("threatexchange")
    if not cli.exists():
        pytest.skip("python-threatexchange's CLI is not installed (a dev dependency)")
    exported = tmp_path / "exported.txt"
    with exported.open("w", encoding="utf-8") as out:
        export_hashes(runtime, "videos", out, fmt="threatexchange", actor="test")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    if importlib.machinery.PathFinder.find_spec("vpdq") is None:  # not installed
        (tmp_path / "stub").mkdir()
        (tmp_path / "stub" / "vpdq.py").write_text("VpdqFeature = object\n")
        env["PYTHONPATH"] = str(tmp_path / "stub")

    def te(*args: str) -> str:
        done = subprocess.run(
            [str(cli), *args], env=env, capture_output=True, text=True, timeout=300, check=True
        )
        return done.stdout

    te("config", "extensions", "add", "threatexchange.extensions.vpdq.manifest")
    te("config", "collab", "edit", "local_file", "--create", "--filename", str(exported), "ours")
    te("fetch")
    outputs = {}
    for name in ("edited", "half", "unrelated"):
        query = tmp_path / f"{name}.vpdq"
        query.write_text(to_signal_str(signatures[name]))
        outputs[name] = te("match", "--only-signal", "vpdq", "--hashes", "video", str(query))
    assert outputs["edited"].startswith("vpdq 100%[100%] (ours)"), outputs
    # Below VPDQIndex's 80 % query match, as our HMA lookup: no match.
    assert outputs["half"].strip() == outputs["unrelated"].strip() == "", outputs
