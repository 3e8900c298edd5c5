"""Encrypted index snapshots and the payload codec (RELIABILITY.md E1-E6)."""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moderation.banks import payload, snapshot_header, snapshot_stream
from moderation.banks.payload import decode_payload, encode_payload
from moderation.banks.snapshot import (
    SnapshotError,
    SnapshotFile,
    key_context,
    read_snapshot,
    read_snapshot_header,
    rewrap_snapshot,
    write_snapshot,
)
from moderation.crypto.envelope import WrappedKey, unwrap_key
from moderation.crypto.errors import UnknownKeyError
from moderation.crypto.keys import KeyRing

ENCODER = "timm/efficientnet_lite0@sha256:0123abcd;resize=224"
# A 256-d float32 vector nobody would produce by accident: the E6 canary.
CANARY = np.arange(256, dtype=np.float32) * np.float32(0.1234567) + np.float32(4242.4242)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({"k1": bytes(range(32))}, "k1")


def small_payload(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_payload(
        {"vectors": rng.standard_normal((2, 4)).astype(np.float32), "ids": np.arange(2)},
        {"seed": seed},
    )


def write(directory: Path, ring: KeyRing, payload: bytes, version: int = 1) -> SnapshotFile:
    return write_snapshot(
        directory, payload, snapshot_id="idx", version=version, encoder_id=ENCODER, keyring=ring
    )


def read(path: Path, ring: KeyRing, version: int = 1, sha256: str | None = None) -> bytearray:
    return read_snapshot(
        path,
        ring,
        expected_snapshot_id="idx",
        expected_version=version,
        expected_encoder_id=ENCODER,
        expected_sha256=sha256,
    )


def canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12 : 12 + length]), data[12 + length :]


def join_file(header: dict[str, Any], body: bytes) -> bytes:
    raw = canonical(header)
    return snapshot_header.MAGIC + struct.pack(">I", len(raw)) + raw + body


def regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of every part of a snapshot file."""
    (length,) = struct.unpack(">I", data[8:12])
    start, end = 12, 12 + length
    raw = data[start:end]
    found = {
        "magic": (0, 8),
        "header_len": (8, 12),
        "header_syntax": (start, start + 2),
        "nonce": (end, end + 12),
        "ciphertext": (end + 12, len(data) - 16),
        "tag": (len(data) - 16, len(data)),
    }
    for name in ("format", "snapshot_id", "version", "encoder_id", "created_at", "key_id"):
        key = f'"{name}":'.encode()
        value = raw.index(key) + len(key)
        stop = raw.index(b",", value) if raw[value] != ord('"') else raw.index(b'"', value + 1) + 1
        found[name] = (start + value, start + stop)
    value = raw.index(b'"wrapped_key":"') + len(b'"wrapped_key":"')
    found["wrapped_key"] = (start + value, start + raw.index(b'"', value))
    return found


def toggle_bit(path: Path, bit: int) -> None:
    """Flip one bit in place (a second call restores it); cheaper than rewriting the file."""
    fd = os.open(path, os.O_RDWR)
    try:
        (byte,) = os.pread(fd, 1, bit // 8)
        os.pwrite(fd, bytes([byte ^ (1 << (bit % 8))]), bit // 8)
    finally:
        os.close(fd)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


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


# --- E6: no plaintext on disk ---------------------------------------------------------------------


def _contains_canary(data: bytes, canary: bytes) -> bool:
    # Any 16-byte window (4 floats) of the canary counts, not only the whole vector.
    return any(canary[i : i + 16] in data for i in range(0, len(canary) - 15, 4))


def test_e6_no_plaintext_reaches_disk(
    tmp_path: Path, ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "var" / "snapshots"
    vectors = np.stack([CANARY, CANARY[::-1], CANARY * 2]).astype(np.float32)
    payload = encode_payload({"vectors": vectors}, {"bank": "known-bad"})
    canary = CANARY.tobytes()
    assert _contains_canary(payload, canary), "the canary must be in the plaintext payload"

    system_tmp = Path(tempfile.gettempdir())
    tmp_before = set(os.listdir(system_tmp))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("snapshots must not use the tempfile module")

    for name in (
        "mkstemp",
        "mkdtemp",
        "mktemp",
        "NamedTemporaryFile",
        "TemporaryFile",
        "SpooledTemporaryFile",
        "TemporaryDirectory",
    ):
        monkeypatch.setattr(tempfile, name, forbidden)
    written: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            written.append(os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # An int is a descriptor from os.open, which the other spy has already seen.
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            written.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    seen_before_removal: list[str] = []

    def scanning(real: Callable[..., Any]) -> Callable[..., Any]:
        # A plaintext temp file removed or renamed away would leave no trace afterwards.
        def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
            if os.path.isfile(path):
                with real_open(path, "rb") as handle:
                    assert not _contains_canary(handle.read(), canary), f"plaintext in {path}"
                seen_before_removal.append(os.fspath(path))
            return real(path, *args, **kwargs)

        return spy

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    for name in ("unlink", "remove", "replace", "rename"):
        monkeypatch.setattr(os, name, scanning(getattr(os, name)))
    info = write(directory, ring, payload)
    plaintext = read(info.path, ring, sha256=info.sha256)
    monkeypatch.undo()

    arrays, _ = decode_payload(plaintext)
    np.testing.assert_array_equal(arrays["vectors"][0], CANARY)
    assert written, "the spy must have seen the snapshot being written"
    assert seen_before_removal, "the spy must have seen the temp file renamed into place"
    for path in written:
        assert Path(path).parent == directory, f"{path} written outside the snapshot directory"
        assert Path(path) == info.path or not Path(path).exists(), f"{path} left behind"
    assert sorted(os.listdir(directory)) == [info.path.name]
    on_disk = info.path.read_bytes()
    assert not _contains_canary(on_disk, canary)
    assert payload[:64] not in on_disk and payload[-64:] not in on_disk
    for name in set(os.listdir(system_tmp)) - tmp_before:
        candidate = system_tmp / name
        if candidate.is_file() and candidate.stat().st_size < 64 * 1024 * 1024:
            assert not _contains_canary(candidate.read_bytes(), canary), candidate


# --- payload codec --------------------------------------------------------------------------------

DTYPES = [
    np.float32,
    np.float16,
    np.float64,
    np.int8,
    np.uint8,
    np.int64,
    np.uint64,
    np.bool_,
    np.complex64,
    ">i4",
    "<U7",
    "S3",
    "M8[ns]",
    "m8[s]",
]
SHAPES = [(), (0,), (0, 256), (5,), (5, 3), (2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_payload_round_trip_dtypes_and_shapes(dtype: Any) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for shape in SHAPES:
        raw = rng.integers(0, 100, size=shape)
        if np.dtype(dtype).kind in "US":
            arrays[f"a{shape}"] = raw.astype(str).astype(dtype)
        else:
            arrays[f"a{shape}"] = raw.astype(dtype)
    meta = {"bank_ids": [1, 2], "threshold": 0.75, "name": "známý", "nested": {"a": None}}
    decoded, decoded_meta = decode_payload(encode_payload(arrays, meta))
    assert decoded_meta == meta
    assert list(decoded) == list(arrays)
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


def test_payload_non_contiguous_input() -> None:
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    arrays = {"strided": base[::2, 1::3], "fortran": np.asfortranarray(base), "t": base.T}
    decoded, _ = decode_payload(encode_payload(arrays, {}))
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_payload_decode_is_zero_copy_and_aligned() -> None:
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "a": np.arange(3, dtype=np.uint8),
        "v": np.ones((4, 8), dtype=np.float32),
    }
    buffer = bytearray(encode_payload(arrays, {}))
    base = np.frombuffer(buffer, dtype=np.uint8)
    decoded, _ = decode_payload(buffer)
    for array in decoded.values():
        assert np.shares_memory(array, base)
        offset = array.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        assert offset % payload.PAYLOAD_ALIGN == 0
    assert decoded["v"].flags.writeable
    read_only, _ = decode_payload(bytes(buffer))
    assert not read_only["v"].flags.writeable


@pytest.mark.parametrize(
    "array",
    [
        np.array([{"a": 1}, None], dtype=object),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.zeros(3, dtype="V4"),
        np.array([(1, {"x": 1})], dtype=[("a", "i4"), ("b", "O")]),
    ],
    ids=["object", "structured", "void", "structured-object"],
)
def test_payload_refuses_object_and_structured_dtypes(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_payload({"x": array}, {})


def test_payload_refuses_non_json_meta() -> None:
    with pytest.raises(ValueError, match="strict JSON"):
        encode_payload({}, {"x": float("nan")})
    with pytest.raises(TypeError):
        encode_payload({}, {"x": object()})


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Trap:
    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_record_unpickling, ("trap",))


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode_payload must never unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


def craft_payload(entries: list[dict[str, Any]], data: bytes) -> bytes:
    """A payload built by hand: header padded so the array data starts at byte 1024."""
    for entry in entries:
        entry.setdefault("offset", 1024)
    raw = json.dumps({"format": 1, "meta": {}, "arrays": entries}).encode()
    header_len = 1024 - len(payload.PAYLOAD_MAGIC) - 8
    assert len(raw) <= header_len
    return payload.PAYLOAD_MAGIC + struct.pack(">Q", header_len) + raw.ljust(header_len) + data


def test_payload_crafted_pickles_are_never_unpickled(monkeypatch: pytest.MonkeyPatch) -> None:
    trap = pickle.dumps(_Trap())
    assert pickle.loads(trap) == "trap" and _UNPICKLED == ["trap"]  # the trap works
    _UNPICKLED.clear()
    npy = io.BytesIO()
    np.save(npy, np.array([_Trap()], dtype=object), allow_pickle=True)

    def entry(dtype: str) -> list[dict[str, Any]]:
        return [{"name": "x", "dtype": dtype, "shape": [len(trap)], "nbytes": len(trap)}]

    arrays, _ = decode_payload(craft_payload(entry("|u1"), trap))  # the crafted layout is valid
    assert arrays["x"].tobytes() == trap
    _forbid_unpickling(monkeypatch)
    crafted = [craft_payload(entry(d), trap) for d in ("|O", "|O8", "O", "|V1", "<f4,<O", "<f4,O8")]
    for data in [trap, npy.getvalue(), payload.PAYLOAD_MAGIC + trap, *crafted]:
        with pytest.raises(ValueError):
            decode_payload(data)
    assert _UNPICKLED == []


def test_payload_malformed_is_refused() -> None:
    def entry(**changes: Any) -> list[dict[str, Any]]:
        base = {"name": "a", "dtype": "<i4", "shape": [10], "nbytes": 40}
        return [{**base, **changes}]

    data = np.arange(10, dtype=np.int32).tobytes()
    arrays, _ = decode_payload(craft_payload(entry(), data))  # the baseline is valid
    np.testing.assert_array_equal(arrays["a"], np.arange(10))
    valid = encode_payload({"a": np.arange(10, dtype=np.int32)}, {"m": 1})
    cases = {
        "truncated": valid[:-1],
        "trailing": valid + b"\0",
        "short": valid[:10],
        "header too long": valid[:8] + struct.pack(">Q", 2**40) + valid[16:],
        "not json": valid[:16] + b"{" * (len(valid) - 16),
        "shape mismatch": craft_payload(entry(shape=[11]), data),
        "nbytes beyond shape": craft_payload(entry(shape=[5]), data),
        "negative dim": craft_payload(entry(shape=[-10], nbytes=-40), data),
        "bool dim": craft_payload(entry(shape=[True]), data),
        "offset before header": craft_payload(entry(offset=0), data),
        "offset past end": craft_payload(entry(offset=2048), data),
        "misaligned gap": craft_payload(entry(offset=1100), bytes(76) + data),
        "bad dtype": craft_payload(entry(dtype="float32"), data),
        "two arrays overlap": craft_payload(entry() + entry(name="b"), data),
        "duplicate name": craft_payload(entry() + entry(offset=1088), data + bytes(24) + data),
    }
    for name, crafted in cases.items():
        with pytest.raises(ValueError):
            decode_payload(crafted)
            pytest.fail(name)


def test_payload_through_snapshot_round_trip(tmp_path: Path, ring: KeyRing) -> None:
    vectors = np.random.default_rng(0).standard_normal((100, 256)).astype(np.float32)
    payload = encode_payload({"vectors": vectors, "pdq": np.zeros((100, 32), np.uint8)}, {"v": 1})
    info = write(tmp_path, ring, payload)
    arrays, meta = decode_payload(read(info.path, ring, sha256=info.sha256))
    np.testing.assert_array_equal(arrays["vectors"], vectors)
    assert meta == {"v": 1} and arrays["pdq"].shape == (100, 32)


@pytest.mark.slow
def test_throughput_256mb(tmp_path: Path, ring: KeyRing) -> None:
    """Prints encode/encrypt+write/read+decrypt/decode times for a 256 MB payload (no asserts on
    speed): 262144 x 256 float32 vectors."""
    vectors = np.random.default_rng(0).standard_normal((262_144, 256), dtype=np.float32)
    t0 = time.perf_counter()
    payload = encode_payload({"vectors": vectors}, {"n": len(vectors)})
    t1 = time.perf_counter()
    info = write(tmp_path, ring, payload)
    t2 = time.perf_counter()
    plaintext = read(info.path, ring)
    t3 = time.perf_counter()
    plaintext_checked = read(info.path, ring, sha256=info.sha256)
    t4 = time.perf_counter()
    arrays, _ = decode_payload(plaintext)
    t5 = time.perf_counter()
    assert np.array_equal(arrays["vectors"], vectors) and plaintext_checked == plaintext
    mb = len(payload) / 1e6
    print(
        f"\n{mb:.0f} MB payload: encode {t1 - t0:.2f} s, encrypt+write {t2 - t1:.2f} s, "
        f"read+decrypt {t3 - t2:.2f} s, read+sha256+decrypt {t4 - t3:.2f} s, "
        f"decode {(t5 - t4) * 1000:.1f} ms"
    )
