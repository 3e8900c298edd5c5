"""Encrypted index snapshots, RELIABILITY.md E4 and E5: rotation re-wraps without
re-encrypting, retired and unknown keys are named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moderation.banks.snapshot import (
    SnapshotError,
    rewrap_snapshot,
)
from moderation.crypto.errors import UnknownKeyError
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    ENCODER,
    join_file,
    read,
    small_payload,
    split_file,
    write,
)

# --- E4 and E5: rotation, retirement, unknown keys -----------------------------------------------


def test_e4_rotation_rewraps_without_reencrypting(tmp_path: Path, ring: KeyRing) -> None:
    payload = small_payload()
    info = write(tmp_path, ring, payload)
    old_copy = tmp_path / "old-copy.snapshot"
    shutil.copyfile(info.path, old_copy)
    _, old_body = split_file(old_copy.read_bytes())

    rotated = ring.with_new_primary("k2")
    assert read(info.path, rotated) == payload, "the new ring still reads k1 snapshots"
    new = rewrap_snapshot(info.path, rotated)
    assert new.key_id == "k2" and new.sha256 != info.sha256
    assert (new.path, new.snapshot_id, new.version, new.encoder_id) == (
        info.path,
        "idx",
        1,
        ENCODER,
    )
    data = info.path.read_bytes()
    assert new.size_bytes == len(data)
    assert new.sha256 == __import__("hashlib").sha256(data).hexdigest()
    header, body = split_file(data)
    assert header["key_id"] == "k2" and body == old_body, "ciphertext must be unchanged"
    assert read(info.path, rotated, sha256=new.sha256) == payload

    retired = rotated.without("k1")
    assert read(info.path, retired, sha256=new.sha256) == payload
    with pytest.raises(SnapshotError, match=r"master key 'k1'.*not in the key ring") as caught:
        read(old_copy, retired)
    assert isinstance(caught.value.__cause__, UnknownKeyError)

    # Re-running rotation leaves an already re-wrapped file alone.
    inode = info.path.stat().st_ino
    assert rewrap_snapshot(info.path, retired) == new
    assert info.path.stat().st_ino == inode
    with pytest.raises(SnapshotError, match="'k1'"):
        rewrap_snapshot(old_copy, retired)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx-v1.snapshot", "old-copy.snapshot"]


def test_e4_rewrap_refuses_a_tampered_header(tmp_path: Path, ring: KeyRing) -> None:
    info = write(tmp_path, ring, small_payload())
    header, body = split_file(info.path.read_bytes())
    header["version"] = 7
    info.path.write_bytes(join_file(header, body))
    with pytest.raises(SnapshotError, match="cannot re-wrap"):
        rewrap_snapshot(info.path, ring.with_new_primary("k2"))


def test_e5_unknown_key_id_is_named(tmp_path: Path, ring: KeyRing) -> None:
    info = write(tmp_path, ring.with_new_primary("k-2031"), small_payload())
    with pytest.raises(SnapshotError, match="master key 'k-2031'") as caught:
        read(info.path, ring)
    assert isinstance(caught.value.__cause__, UnknownKeyError)
    assert caught.value.path == info.path and caught.value.version == 1
