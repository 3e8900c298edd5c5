"""The ``moderation`` CLI end to end, as a user runs it: RELIABILITY.md I1-I7 and E1, E2, E4, E6.

Commands run in-process through click's runner (same code path as the console script) with
``MODERATION_DATA_DIR`` pointing at a private directory.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import eps, minimal_gif, png_from_header
from PIL import Image

from tests.conftest import Cli, assert_nowhere_in, bank_photos, skimage_photo, skimage_photo_path

BANNED = ("chelsea", "astronaut", "coffee")


@pytest.fixture
def banked(cli: Cli, tmp_path: Path) -> Iterator[Cli]:
    """Initialised data dir with bank ``known-bad`` holding three skimage photos."""
    bank_photos(cli, tmp_path / "banned", BANNED)
    yield cli


def jpeg_file(path: Path, image: Image.Image, **save: Any) -> Path:
    image.save(path, "JPEG", quality=85, **save)
    return path


# --- set-up and banks -----------------------------------------------------------------------


def test_commands_before_init_fail_with_a_clear_message(cli: Cli) -> None:
    result = cli("bank", "list", ok=False)
    assert result.exit_code == 3
    assert "moderation init" in result.stderr


def test_init_creates_a_private_dev_key_file_and_says_so(cli: Cli) -> None:
    result = cli("init")
    key_file = cli.data_dir / "keys.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "DEVELOPMENT" in result.stderr
    assert json.loads(result.stdout)["keys"] == "key file"
    second = cli("init")  # idempotent, and no second warning about creating a key
    assert "created a DEVELOPMENT key file" not in second.stderr


def test_bank_import_files_folders_and_zips_with_relative_source_refs(
    cli: Cli, tmp_path: Path
) -> None:
    cli("init")
    cli("bank", "create", "known-bad", "--category", "default")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(skimage_photo_path("chelsea"), folder / "sub" / "cat.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(skimage_photo_path("coffee"), "inner/coffee.png")
    single = shutil.copy(skimage_photo_path("rocket"), tmp_path / "rocket.jpg")
    result = cli("bank", "import", "known-bad", str(folder), str(archive), str(single))
    report = json.loads(result.stdout)
    assert report["added"] == 3
    skipped = {s["source_ref"]: s["reason"] for s in report["skipped"]}
    assert skipped["notes.txt"] == "not_an_image_name"
    assert skipped["broken.jpg"] in ("truncated", "corrupt", "unsupported_format")
    assert "skipped broken.jpg" in result.stderr
    entries = cli.json_lines("bank", "entries", "known-bad", "--json")
    assert {e["source_ref"] for e in entries} == {"sub/cat.png", "inner/coffee.png", "rocket.jpg"}
    assert set(entries[0]) == {"entry_id", "bank", "label", "source_ref", "added_at", "disabled"}
    # Importing the same files again adds nothing: duplicates are skipped with the reason.
    again = json.loads(cli("bank", "import", "known-bad", str(folder)).stdout)
    assert again["added"] == 0
    assert {"source_ref": "sub/cat.png", "reason": "duplicate"} in again["skipped"]


def test_hash_prints_pdq_hex_and_quality(cli: Cli) -> None:
    (row,) = cli.json_lines("hash", str(skimage_photo_path("chelsea")), "--json")
    assert len(row["pdq"]) == 64 and int(row["pdq"], 16) >= 0
    assert 0 <= row["quality"] <= 100


# --- screening and bad input ------------------------------------------------------------------


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """File name -> (path, expected unscannable reason): RELIABILITY.md I1, I3, I4, I7."""
    folder.mkdir(exist_ok=True)
    rocket = (skimage_photo_path("rocket")).read_bytes()
    files = {
        "huge.png": (
            png_from_header(30000, 30000, bit_depth=8, colour_type=2, idat=b""),
            "too_large",
        ),
        "eps.png": (eps(), "unsupported_format"),
        "frames.gif": (minimal_gif(10_000), "too_many_frames"),
        "truncated.jpg": (rocket[: len(rocket) // 3], "truncated"),
        "empty.jpg": (b"", "empty"),
        "garbage.png": (bytes(range(256)) * 8, "unsupported_format"),
    }
    out = {}
    for name, (data, reason) in files.items():
        path = folder / name
        path.write_bytes(data)
        out[name] = (path, reason)
    return out


def test_screen_json_decisions_and_bad_inputs_exit_zero(banked: Cli, tmp_path: Path) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    cat = skimage_photo("chelsea")
    copy = jpeg_file(queries / "cat-copy.jpg", cat.crop((10, 10, 430, 290)).resize((300, 200)))
    unrelated = jpeg_file(queries / "space.jpg", skimage_photo("hubble_deep_field"))
    bad = bad_inputs(queries)
    paths = [str(copy), str(unrelated), *(str(p) for p, _ in bad.values())]
    rows = banked.json_lines("screen", *paths, "--json", "--external-id-prefix", "t-")
    assert [r["path"] for r in rows] == paths
    contract = {
        "path",
        "decision",
        "policy",
        "score",
        "reason",
        "decided_by",
        "matches",
        "timings_ms",
    }
    assert all(contract <= set(r) for r in rows)
    assert rows[0]["decision"] == "block"
    top = rows[0]["matches"][0]
    assert top["decided_by"] == rows[0]["decided_by"] and top["level"] == "block"
    assert top["signals"]["global_cosine"]["value"] == top["cosine"]
    assert [r["decided_by"] for r in rows[1:]] == ["no_match"] + ["unscannable"] * len(bad)
    assert rows[0]["matches"][0]["bank"] == "known-bad"
    assert rows[0]["matches"][0]["entry_id"].startswith("e_")
    assert set(rows[0]["timings_ms"]) >= {"decode", "embed", "search", "classify", "total"}
    assert rows[1]["decision"] == "allow"
    for row, (name, (_, reason)) in zip(rows[2:], bad.items(), strict=True):
        assert (row["decision"], row["reason"]) == ("unscannable", reason), name


def test_file_over_the_byte_limit_is_not_read(
    banked: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODERATION_MAX_IMAGE_BYTES", "1000")
    big = jpeg_file(tmp_path / "big.jpg", skimage_photo("rocket"))
    (row,) = banked.json_lines("screen", str(big), "--json")
    assert (row["decision"], row["reason"]) == ("unscannable", "too_large")


def test_screen_a_video_file(banked: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.video_clips import clip, photo

    # Videos have their own byte limit: an image limit below the video's size does not apply.
    monkeypatch.setenv("MODERATION_MAX_IMAGE_BYTES", "1000")
    video = tmp_path / "flash.mp4"
    video.write_bytes(
        clip([(photo("rocket"), 1.5), (photo("astronaut"), 0.4), (photo("horse"), 1.5)])
    )
    (row,) = banked.json_lines("screen", str(video), "--json")
    assert row["decision"] == "block"
    assert row["matches"][0]["label"] == "astronaut"
    assert row["matches"][0]["timestamp_s"] == pytest.approx(1.5)
    monkeypatch.setenv("MODERATION_MAX_VIDEO_BYTES", "1000")
    (row,) = banked.json_lines("screen", str(video), "--json")
    assert (row["decision"], row["reason"]) == ("unscannable", "too_large")


def test_banned_photo_with_exif_rotation_is_blocked(banked: Cli, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = skimage_photo("astronaut").transpose(Image.Transpose.ROTATE_90)
    path = jpeg_file(tmp_path / "rotated.jpg", stored, exif=exif.tobytes())
    (row,) = banked.json_lines("screen", str(path), "--json")
    assert row["decision"] == "block"
    assert row["matches"][0]["label"] == "astronaut"


def test_disable_entry_stops_matching(banked: Cli, tmp_path: Path) -> None:
    copy = jpeg_file(tmp_path / "coffee.jpg", skimage_photo("coffee"))
    (before,) = banked.json_lines("screen", str(copy), "--json")
    entry_id = before["matches"][0]["entry_id"]
    banked("bank", "disable-entry", entry_id)
    (after,) = banked.json_lines("screen", str(copy), "--json")
    assert after["decision"] == "allow"
    banked("bank", "enable-entry", entry_id)
    (again,) = banked.json_lines("screen", str(copy), "--json")
    assert again["decision"] == "block"


def test_bad_policy_stops_start_up_naming_file_and_field(
    banked: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(
        "name: default\ncategories:\n  default:\n    block_cosine: 2\n    review_cosine: 0.5\n"
    )
    monkeypatch.setenv("MODERATION_POLICIES_DIR", str(policies))
    result = banked("screen", str(skimage_photo_path("rocket")), ok=False)
    assert result.exit_code == 3
    assert "default.yaml" in result.stderr and "block_cosine" in result.stderr


# --- encryption at rest ---------------------------------------------------------------------


def current_snapshot(cli: Cli) -> Path:
    """The newest version's file (a delta version's base is kept beside it)."""
    from moderation.banks.snapshot import read_snapshot_header

    files = (cli.data_dir / "snapshots").glob("*.snapshot")
    return max(files, key=lambda path: int(str(read_snapshot_header(path)["version"])))


def test_no_plaintext_vectors_or_pdq_digests_under_the_data_dir(banked: Cli) -> None:
    """RELIABILITY.md E6: after import and screening, scan every file for the signals."""
    from moderation.signals.encoders import create_encoder
    from moderation.signals.pdq import pdq_hash

    banked("screen", str(skimage_photo_path("chelsea")), "--json")
    encoder = create_encoder("timm/efficientnet_lite0")
    images = [skimage_photo(name) for name in BANNED]
    vectors = encoder.encode(images)
    needles: list[bytes] = []
    for vector in vectors:
        raw = vector.astype(np.float32).tobytes()
        needles += [raw[i : i + 32] for i in range(0, 256, 64)]  # windows of the float bytes
        needles.append(np.float16(vector).tobytes()[:32])
        needles.append(json.dumps([round(float(v), 4) for v in vector[:6]])[1:-1].encode())
    for image in images:
        digest = pdq_hash(image)
        needles += [digest.digest, digest.hex.encode(), digest.hex.upper().encode()]
    assert_nowhere_in(banked.data_dir, needles)


def test_flipped_bit_in_snapshot_stops_screening_with_a_clear_error(banked: Cli) -> None:
    """RELIABILITY.md E1 (fail closed)."""
    path = current_snapshot(banked)
    original = path.read_bytes()
    for offset in (len(original) // 2, len(original) - 3, 40):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(bytes(tampered))
        result = banked("screen", str(skimage_photo_path("chelsea")), "--json", ok=False)
        assert result.exit_code == 3
        assert result.stdout == ""  # nothing was screened
        assert "snapshot" in result.stderr and path.name.split("-v")[0] in result.stderr
    path.write_bytes(original)
    (row,) = banked.json_lines("screen", str(skimage_photo_path("chelsea")), "--json")
    assert row["decision"] == "block"


def test_older_snapshot_substituted_for_the_current_one_is_refused(
    banked: Cli, tmp_path: Path
) -> None:
    """RELIABILITY.md E2."""
    old = current_snapshot(banked)
    saved = tmp_path / "old.snapshot"
    shutil.copy(old, saved)
    banked("bank", "import", "known-bad", str(skimage_photo_path("rocket")))
    current = current_snapshot(banked)
    assert current != old  # a delta on ``old``, which is kept until compaction
    shutil.copy(saved, current)
    result = banked("screen", str(skimage_photo_path("chelsea")), ok=False)
    assert result.exit_code == 3
    assert "snapshot" in result.stderr


def test_key_rotation_rewraps_and_retires_the_old_key(banked: Cli, tmp_path: Path) -> None:
    """RELIABILITY.md E4: new primary, re-wrap, retire; old copies become unreadable."""
    old_key = json.loads(banked("init").stdout)["primary_key_id"]
    old_copy = tmp_path / "before-rotation.snapshot"
    shutil.copy(current_snapshot(banked), old_copy)
    report = json.loads(banked("keys", "rotate").stdout)
    assert report["retired"] == [old_key]
    assert report["primary_key_id"] != old_key
    assert report["rewrapped"]["snapshots"] == 1 and report["rewrapped"]["uploads"] >= 0
    (row,) = banked.json_lines("screen", str(skimage_photo_path("coffee")), "--json")
    assert row["decision"] == "block"
    keys = json.loads((banked.data_dir / "keys.json").read_text())
    assert old_key not in json.dumps(keys)
    # The old copy (wrapped under the retired key) can no longer be read: put back in place it
    # is refused, and even without the database's digest check the key is gone.
    from moderation.banks.snapshot import SnapshotError, read_snapshot, read_snapshot_header
    from moderation.crypto.keys import KeyRing

    current = current_snapshot(banked)
    shutil.copy(old_copy, current)
    result = banked("screen", str(skimage_photo_path("coffee")), ok=False)
    assert result.exit_code == 3
    header = read_snapshot_header(old_copy)
    with pytest.raises(SnapshotError, match=old_key):
        read_snapshot(
            old_copy,
            KeyRing.load_file(banked.data_dir / "keys.json"),
            expected_snapshot_id=str(header["snapshot_id"]),
            expected_version=int(str(header["version"])),
            expected_encoder_id=str(header["encoder_id"]),
        )


def test_uploads_are_stored_encrypted_and_readable_with_the_key(banked: Cli) -> None:
    from sqlalchemy import select

    from moderation.config import load_settings
    from moderation.service.runtime import Runtime
    from moderation.service.uploads import read_upload
    from moderation.storage.models import Upload

    photo = skimage_photo_path("coffee")
    (row,) = banked.json_lines("screen", str(photo), "--json")
    runtime = Runtime(load_settings())
    with runtime.sessions() as session:
        upload = session.scalar(select(Upload).where(Upload.id == row["upload_id"]))
        assert upload is not None and upload.blob_ref
        blob = (runtime.settings.blobs_dir / upload.blob_ref).read_bytes()
        assert photo.read_bytes()[:64] not in blob
        data = read_upload(upload, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir)
    assert data == photo.read_bytes()
    runtime.engine.dispose()
