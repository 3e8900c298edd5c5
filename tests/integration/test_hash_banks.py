"""Hash-list banks end to end (issue 13): import, PDQ-only and exact matching, keyed storage,
export round trip, and interoperability with python-threatexchange's own CLI.

Commands run in-process through click's runner against a private data directory; photos are
scikit-image's, lists are written by the tests (ThreatExchange's own test vectors when
``../shared`` is beside the checkout).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moderation.signals.pdq import pdq_hash
from tests.conftest import Cli, assert_nowhere_in, shared_path, skimage_photo, skimage_photo_path

LISTED = ("chelsea", "coffee")
UNLISTED = "rocket"


def pdq_hex(name: str) -> str:
    return pdq_hash(skimage_photo(name)).hex


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def lists(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """An initialised data dir with an empty block bank ``lists``; classifier stage off (hash
    lists carry no images to train it on)."""
    monkeypatch.setenv("MODERATION_CLASSIFIER", "false")
    cli("init")
    cli("bank", "create", "lists")
    return cli


def import_hashes(cli: Cli, path: Path, *extra: str) -> dict[str, object]:
    result = cli("bank", "import-hashes", "lists", str(path), *extra)
    report: dict[str, object] = json.loads(result.stdout)
    return report


def screen(cli: Cli, *paths: Path) -> list[dict[str, object]]:
    return cli.json_lines("screen", *map(str, paths), "--json")


def test_a_pdq_list_blocks_the_photos_it_came_from_and_nothing_else(
    lists: Cli, tmp_path: Path
) -> None:
    listing = write_lines(tmp_path / "list.txt", [f"pdq {pdq_hex(name)}" for name in LISTED])
    report = import_hashes(lists, listing)
    assert report["added"] == 2 and report["format"] == "threatexchange"
    results = screen(lists, *(skimage_photo_path(n) for n in (*LISTED, UNLISTED)))
    assert [r["decision"] for r in results] == ["block", "block", "allow"]
    top = results[0]["matches"][0]  # type: ignore[index]
    assert top["pdq_distance"] == 0 and top["cosine"] is None and top["bank"] == "lists"


def test_threatexchange_test_vectors_match_the_images_they_came_from(
    lists: Cli, tmp_path: Path
) -> None:
    root = shared_path("threatexchange-pdq")
    with (root / "expected-pdq.csv").open() as handle:
        rows = [(root / r["path"], r["pdq_hex"]) for r in csv.DictReader(handle)]
    # Images whose own PDQ quality is below 50 are never matched by PDQ (ThreatExchange's
    # recommendation, policy ``candidates.min_pdq_quality``), so they are left out here.
    present = [
        (path, digest)
        for path, digest in rows
        if path.exists() and pdq_hash(Image.open(path).convert("RGB")).quality >= 50
    ]
    assert len(present) >= 5
    listing = write_lines(tmp_path / "te.txt", [f"pdq {digest}" for _, digest in present])
    import_hashes(lists, listing)
    results = screen(lists, *(path for path, _ in present))
    for (path, _), result in zip(present, results, strict=True):
        assert result["decision"] == "block", (path, result)
        assert min(m["pdq_distance"] for m in result["matches"]) <= 16  # type: ignore[attr-defined]


def test_a_corrupted_line_is_reported_with_its_number_and_nothing_is_imported(
    lists: Cli, tmp_path: Path
) -> None:
    good = [f"pdq {pdq_hex(name)}" for name in LISTED]
    listing = write_lines(tmp_path / "bad.txt", [good[0], "pdq 0123456789abcdef", good[1]])
    result = lists("bank", "import-hashes", "lists", str(listing), ok=False)
    assert result.exit_code == 1
    assert "bad.txt:2:" in result.stderr and "nothing imported" in result.stderr
    assert lists.json_lines("bank", "entries", "lists", "--json") == []
    assert not list((lists.data_dir / "snapshots").glob("*.snapshot"))


def test_low_quality_pdq_is_skipped_with_the_reason_and_duplicates_merge(
    lists: Cli, tmp_path: Path
) -> None:
    chelsea, coffee = (pdq_hex(name) for name in LISTED)
    listing = write_lines(tmp_path / "q.txt", [f"{chelsea},90", f"{coffee},40", f"{chelsea},90"])
    report = import_hashes(lists, listing, "--format", "pdq")
    assert report["added"] == 1 and report["merged"] == 1
    (skipped,) = report["skipped"]  # type: ignore[misc]
    assert skipped["line"] == 2 and "quality" in skipped["reason"]
    again = import_hashes(lists, listing, "--format", "pdq")
    assert again["added"] == 0 and again["merged"] == 2


def test_an_exact_md5_blocks_the_identical_file_and_nothing_else(
    lists: Cli, tmp_path: Path
) -> None:
    original = tmp_path / "chelsea.png"
    skimage_photo("chelsea").save(original)
    reencoded = tmp_path / "chelsea.jpg"
    skimage_photo("chelsea").save(reencoded, quality=95)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    lines = [f"md5 {hashlib.md5(p.read_bytes()).hexdigest()}" for p in (original, garbage)]
    import_hashes(lists, write_lines(tmp_path / "md5.txt", lines))
    same, other, undecodable = screen(lists, original, reencoded, garbage)
    assert same["decision"] == "block"
    assert same["matches"][0]["exact"] == "md5"  # type: ignore[index]
    assert other["decision"] == "allow"  # same picture, other bytes: no exact match, no PDQ
    assert undecodable["decision"] == "block"  # on a list: never merely unscannable


def test_no_digest_or_exact_hash_in_plaintext_under_the_data_dir(
    lists: Cli, tmp_path: Path
) -> None:
    photo = skimage_photo_path("astronaut").read_bytes()
    digests = {kind: hashlib.new(kind, photo).digest() for kind in ("md5", "sha1", "sha256")}
    pdq = pdq_hash(skimage_photo("chelsea"))
    lines = [f"pdq {pdq.hex}", *(f"{k} {d.hex()}" for k, d in digests.items())]
    import_hashes(lists, write_lines(tmp_path / "mixed.txt", lines))
    # Loading and screening must not spill them either (an unlisted photo: an upload's own
    # SHA-256 is stored with it, which is not what this test is about).
    screen(lists, skimage_photo_path(UNLISTED))
    needles = [pdq.digest, pdq.hex.encode(), pdq.hex.upper().encode()]
    for digest in digests.values():
        needles += [digest, digest.hex().encode(), digest.hex().upper().encode()]
    assert_nowhere_in(lists.data_dir, needles)


def test_export_then_import_into_a_fresh_data_dir_gives_the_same_matches(
    lists: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = skimage_photo_path("astronaut")
    lines = [
        *(f"pdq {pdq_hex(name)}" for name in LISTED),
        f"sha256 {hashlib.sha256(photo.read_bytes()).hexdigest()}",
    ]
    import_hashes(lists, write_lines(tmp_path / "src.txt", lines))
    queries = [*(skimage_photo_path(n) for n in (*LISTED, UNLISTED)), photo]
    before = screen(lists, *queries)
    exported = tmp_path / "export.txt"
    lists("bank", "export-hashes", "lists", "--format", "threatexchange", "--out", str(exported))
    assert exported.stat().st_mode & 0o077 == 0
    fresh = Cli(tmp_path / "fresh" / "var", monkeypatch)
    monkeypatch.setenv("MODERATION_CLASSIFIER", "false")
    fresh("init")
    fresh("bank", "create", "lists")
    assert import_hashes(fresh, exported)["added"] == 3
    after = screen(fresh, *queries)
    assert [r["decision"] for r in after] == [r["decision"] for r in before]
    assert [r["decision"] for r in after] == ["block", "block", "allow", "block"]
    assert [[m.get("exact") for m in r["matches"]] for r in after] == [  # type: ignore[attr-defined]
        [m.get("exact") for m in r["matches"]]  # type: ignore[attr-defined]
        for r in before
    ]


def test_python_threatexchange_matches_photos_against_our_export(
    lists: Cli, tmp_path: Path
) -> None:
    pytest.importorskip("threatexchange", reason="python-threatexchange is a dev dependency")
    te = shutil.which("threatexchange", path=str(Path(sys.executable).parent))
    assert te is not None, "the threatexchange CLI is installed with its package"
    import_hashes(lists, write_lines(tmp_path / "l.txt", [f"pdq {pdq_hex(n)}" for n in LISTED]))
    exported = tmp_path / "export.txt"
    lists("bank", "export-hashes", "lists", "--out", str(exported))
    env = {**os.environ, "HOME": str(tmp_path / "te-home")}

    def run(*args: str) -> str:
        done = subprocess.run(
            [te, *args], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout

    run("config", "collab", "edit", "local_file", "--create", "--filename", str(exported), "ours")
    run("fetch")
    assert "ours" in run("match", "photo", str(skimage_photo_path("chelsea")))
    assert "ours" not in run("match", "photo", str(skimage_photo_path(UNLISTED)))
