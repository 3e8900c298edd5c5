"""Encrypted index snapshots: round trips, the readable header, identity checks, failed writes."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moderation.banks import snapshot_stream
from moderation.banks.snapshot import (
    SnapshotError,
    key_context,
    read_snapshot_header,
    write_snapshot,
)
from moderation.crypto.envelope import WrappedKey, unwrap_key
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    ENCODER,
    flip,
    read,
    regions,
    small_payload,
    write,
)

# --- round trip ----------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, ring: KeyRing) -> None:
    payload = small_payload()
    info = write(tmp_path / "snapshots", ring, payload)
    assert info.path == tmp_path / "snapshots" / "idx-v1.snapshot"
    assert (info.snapshot_id, info.version, info.encoder_id, info.key_id) == (
        "idx",
        1,
        ENCODER,
        "k1",
    )
    data = info.path.read_bytes()
    assert info.size_bytes == len(data)
    assert info.sha256 == __import__("hashlib").sha256(data).hexdigest()
    assert oct(info.path.stat().st_mode & 0o777) == oct(0o600)
    assert read(info.path, ring) == payload
    assert read(info.path, ring, sha256=info.sha256.upper()) == payload


def test_empty_payload_round_trip(tmp_path: Path, ring: KeyRing) -> None:
    info = write(tmp_path, ring, b"")
    assert read(info.path, ring, sha256=info.sha256) == b""


def test_multi_chunk_round_trip_and_flips(
    tmp_path: Path, ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming in chunks (here 1000 bytes) must not change the format or weaken the tag."""
    monkeypatch.setattr(snapshot_stream, "CHUNK_BYTES", 1000)
    payload = np.random.default_rng(1).bytes(10_500)
    info = write(tmp_path, ring, payload)
    assert read(info.path, ring, sha256=info.sha256) == payload
    data = info.path.read_bytes()
    start, end = regions(data)["ciphertext"]
    for offset in (start, start + 999, start + 1000, start + 5000, end - 1):
        info.path.write_bytes(flip(data, offset * 8))
        with pytest.raises(SnapshotError, match="does not authenticate"):
            read(info.path, ring)
        # Hashed on a second thread while decrypting, chunk by chunk: the digest still decides.
        with pytest.raises(SnapshotError, match="SHA-256 is"):
            read(info.path, ring, sha256=info.sha256)
    info.path.write_bytes(data)


def test_a_valid_file_with_another_digest_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    """The file decrypts and authenticates, but it is not the one the database recorded."""
    info = write(tmp_path, ring, small_payload())
    with pytest.raises(SnapshotError, match="SHA-256 is " + info.sha256):
        read(info.path, ring, sha256="0" * 64)
    assert read(info.path, ring, sha256=info.sha256) == small_payload()


def test_header_is_readable_without_keys(tmp_path: Path, ring: KeyRing) -> None:
    info = write(tmp_path, ring, small_payload())
    header = read_snapshot_header(info.path)
    assert header["snapshot_id"] == "idx" and header["version"] == 1
    assert header["encoder_id"] == ENCODER and header["key_id"] == "k1"
    assert header["format"] == 1
    assert isinstance(header["created_at"], str) and header["created_at"].endswith("Z")
    wrapped = WrappedKey("k1", base64.b64decode(str(header["wrapped_key"])))
    assert len(unwrap_key(wrapped, ring, context=key_context("idx", 1, ENCODER))) == 32


@pytest.mark.parametrize("content", [b"", b"MODSNAP\x00", b"not a snapshot at all", b"\x00" * 64])
def test_header_of_garbage_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.snapshot"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=str(path)):
        read_snapshot_header(path)


def test_missing_file_names_the_snapshot(tmp_path: Path, ring: KeyRing) -> None:
    with pytest.raises(SnapshotError, match=r"snapshot 'idx' version 3 at .*cannot open"):
        read(tmp_path / "idx-v3.snapshot", ring, version=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"snapshot_id": "../escape"}, "invalid snapshot id"),
        ({"snapshot_id": ""}, "invalid snapshot id"),
        ({"version": -1}, "invalid snapshot version"),
        ({"version": True}, "invalid snapshot version"),
        ({"encoder_id": ""}, "encoder_id"),
    ],
)
def test_write_rejects_bad_identity(
    tmp_path: Path, ring: KeyRing, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"snapshot_id": "idx", "version": 1, "encoder_id": ENCODER}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        write_snapshot(tmp_path, b"x", keyring=ring, **args)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = write(tmp_path, ring, small_payload(1))
    before = info.path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(SnapshotError, match=r"idx.*version 1.*disk full"):
        write(tmp_path, ring, small_payload(2))
    with pytest.raises(SnapshotError, match="disk full"):
        write(tmp_path, ring, small_payload(2), version=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx-v1.snapshot"]
    assert info.path.read_bytes() == before
