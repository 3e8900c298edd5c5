"""Encrypted index snapshots, RELIABILITY.md E1-E3: every bit is covered, substituted files
are refused, and no two snapshots share a data key.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from moderation.banks import snapshot_header
from moderation.banks.snapshot import (
    SnapshotError,
    key_context,
    read_snapshot,
)
from moderation.crypto.envelope import WrappedKey, unwrap_key
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    ENCODER,
    canonical,
    flip,
    join_file,
    read,
    regions,
    small_payload,
    split_file,
    write,
)


def toggle_bit(path: Path, bit: int) -> None:
    """Flip one bit in place (a second call restores it); cheaper than rewriting the file."""
    fd = os.open(path, os.O_RDWR)
    try:
        (byte,) = os.pread(fd, 1, bit // 8)
        os.pwrite(fd, bytes([byte ^ (1 << (bit % 8))]), bit // 8)
    finally:
        os.close(fd)


# --- E1: every bit is covered --------------------------------------------------------------------

REGIONS = [
    "magic",
    "header_len",
    "header_syntax",
    "format",
    "snapshot_id",
    "version",
    "encoder_id",
    "created_at",
    "key_id",
    "wrapped_key",
    "nonce",
    "ciphertext",
    "tag",
]


@pytest.mark.parametrize("with_sha", [False, True], ids=["no-sha", "sha"])
@pytest.mark.parametrize("region", REGIONS)
def test_e1_bit_flip_in_each_region_is_refused(
    tmp_path: Path, ring: KeyRing, region: str, with_sha: bool
) -> None:
    info = write(tmp_path, ring, small_payload())
    data = info.path.read_bytes()
    start, end = regions(data)[region]
    middle = (start + end) // 2
    for bit in (start * 8, middle * 8 + 3, end * 8 - 1):
        info.path.write_bytes(flip(data, bit))
        with pytest.raises(SnapshotError) as caught:
            read(info.path, ring, sha256=info.sha256 if with_sha else None)
        message = str(caught.value)
        assert str(info.path) in message and "'idx'" in message and "version 1" in message
        if with_sha:
            assert "SHA-256" in message
    info.path.write_bytes(data)
    assert read(info.path, ring) == small_payload(), "the original must still read"


def test_e1_every_single_bit_flip_is_caught_without_a_digest(tmp_path: Path, ring: KeyRing) -> None:
    """Without ``expected_sha256`` the format and the cryptography alone catch every flip."""
    info = write(tmp_path, ring, small_payload())
    data = info.path.read_bytes()
    escaped = []
    for bit in range(len(data) * 8):
        toggle_bit(info.path, bit)
        try:
            read(info.path, ring)
            escaped.append(bit)
        except SnapshotError:
            pass
        toggle_bit(info.path, bit)
    assert escaped == [], f"bit flips not detected at bits {escaped[:20]}"
    assert info.path.read_bytes() == data


@pytest.mark.parametrize("cut", ["truncate", "append"])
def test_e1_truncated_or_extended_file_is_refused(tmp_path: Path, ring: KeyRing, cut: str) -> None:
    info = write(tmp_path, ring, small_payload())
    data = info.path.read_bytes()
    bounds = sorted({b for r in regions(data).values() for b in r if 0 < b < len(data)})
    for size in [*bounds, len(data) - 1, 1]:
        info.path.write_bytes(data[:size] if cut == "truncate" else data + data[:size])
        with pytest.raises(SnapshotError, match=str(info.path)):
            read(info.path, ring)


def test_e1_non_canonical_header_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    """Same values, different bytes (spaces, escapes): refused, so a file's SHA-256 identifies
    its content and no byte of the file is left unchecked."""
    info = write(tmp_path, ring, small_payload())
    header, body = split_file(info.path.read_bytes())
    for raw in (
        json.dumps(header, sort_keys=True).encode(),
        canonical(header).replace(b'"idx"', b'"\\u0069dx"'),
        canonical(header).replace(b"}", b" }"),
    ):
        assert json.loads(raw) == header
        info.path.write_bytes(snapshot_header.MAGIC + struct.pack(">I", len(raw)) + raw + body)
        with pytest.raises(SnapshotError, match="canonical"):
            read(info.path, ring)
    info.path.write_bytes(join_file(header, body))
    assert read(info.path, ring) == small_payload()


# --- E2: substitution -----------------------------------------------------------------------------


def test_e2_older_version_copied_over_the_current_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    v1 = write(tmp_path, ring, small_payload(1), version=1)
    v2 = write(tmp_path, ring, small_payload(2), version=2)
    shutil.copyfile(v1.path, v2.path)
    with pytest.raises(SnapshotError, match="header version is 1, expected 2"):
        read(v2.path, ring, version=2)
    with pytest.raises(SnapshotError, match="SHA-256"):
        read(v2.path, ring, version=2, sha256=v2.sha256)


def test_e2_relabelled_version_is_refused_by_the_wrap(tmp_path: Path, ring: KeyRing) -> None:
    """An attacker rewriting v1's header to claim version 2 (well-formed JSON) is caught."""
    v1 = write(tmp_path, ring, small_payload(1), version=1)
    header, body = split_file(v1.path.read_bytes())
    header["version"] = 2
    forged = tmp_path / "idx-v2.snapshot"
    forged.write_bytes(join_file(header, body))
    with pytest.raises(SnapshotError, match="does not unwrap with master key 'k1'"):
        read(forged, ring, version=2)


def test_e2_relabelled_created_at_is_refused_by_the_payload_tag(
    tmp_path: Path, ring: KeyRing
) -> None:
    info = write(tmp_path, ring, small_payload())
    header, body = split_file(info.path.read_bytes())
    header["created_at"] = "2000-01-01T00:00:00Z"
    info.path.write_bytes(join_file(header, body))
    with pytest.raises(SnapshotError, match="does not authenticate"):
        read(info.path, ring)


def test_e2_wrapped_key_transplanted_between_writes_is_refused(
    tmp_path: Path, ring: KeyRing
) -> None:
    """Same id, version and encoder (e.g. a retried build): each file has its own data key."""
    a = write(tmp_path / "a", ring, small_payload(1))
    b = write(tmp_path / "b", ring, small_payload(2))
    header_a, body_a = split_file(a.path.read_bytes())
    header_b, _ = split_file(b.path.read_bytes())
    header_a["wrapped_key"] = header_b["wrapped_key"]
    a.path.write_bytes(join_file(header_a, body_a))
    with pytest.raises(SnapshotError, match="does not authenticate"):
        read(a.path, ring)


def test_e2_another_deployments_snapshot_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    other = KeyRing({"k1": bytes(range(1, 33))}, "k1")  # same id string, other key bytes
    info = write(tmp_path, other, small_payload())
    with pytest.raises(SnapshotError, match=r"'k1'.*another deployment"):
        read(info.path, ring)


@pytest.mark.parametrize(
    ("field", "expected"),
    [("snapshot_id", "other-index"), ("encoder_id", "open_clip/ViT-B-32/laion2b_s34b_b79k")],
)
def test_e2_other_index_or_encoder_is_refused(
    tmp_path: Path, ring: KeyRing, field: str, expected: str
) -> None:
    info = write(tmp_path, ring, small_payload())
    kwargs = {"expected_snapshot_id": "idx", "expected_version": 1, "expected_encoder_id": ENCODER}
    kwargs[f"expected_{field}"] = expected
    with pytest.raises(SnapshotError, match=f"header {field} is"):
        read_snapshot(info.path, ring, **kwargs)  # type: ignore[arg-type]


# --- E3: fresh data keys --------------------------------------------------------------------------


def test_e3_two_snapshots_never_share_a_data_key(tmp_path: Path, ring: KeyRing) -> None:
    payload = small_payload()
    files = [write(tmp_path / name, ring, payload) for name in ("a", "b", "c")]
    keys, nonces = set(), set()
    for info in files:
        header, body = split_file(info.path.read_bytes())
        wrapped = WrappedKey(header["key_id"], base64.b64decode(header["wrapped_key"]))
        keys.add(unwrap_key(wrapped, ring, context=key_context("idx", 1, ENCODER)))
        nonces.add(body[:12])
    assert len(keys) == 3 and len(nonces) == 3
    assert len({f.sha256 for f in files}) == 3
