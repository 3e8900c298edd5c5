"""Shared helpers of the unit tests, by the topic whose files use them: random unit vectors and
ids (``test_index_*.py``); photos, image comparison and unscannable reasons (``test_imaging_*.py``);
the key ring (shared by the snapshot and crypto tests), payloads and file surgery of the snapshot
tests (``test_snapshot_*.py``); keys and a permissive umask (``test_crypto_*.py``); real
hash values, sample lists and records of the hash-list format tests (``test_hashlists_*.py``).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import struct
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import encode
from PIL import Image

from moderation.banks import snapshot_header
from moderation.banks.hashlists.records import (
    HashRecord,
)
from moderation.banks.payload import encode_payload
from moderation.banks.snapshot import (
    SnapshotFile,
    read_snapshot,
    write_snapshot,
)
from moderation.crypto.keys import KeyRing
from moderation.media.decode import (
    UNSCANNABLE_REASONS,
    UnscannableImage,
)
from tests.conftest import skimage_photo

# --- signal indexes (test_index_*.py) ------------------------------------------------------


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(10**12, size=n, replace=False).astype(np.int64)


# --- safe decoding (test_imaging_*.py) ---------------------------------------------------


def small(image: Image.Image, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Box-filtered to a small size as float: removes dither and codec noise before comparing."""
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(small(a) - small(b)).mean())


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(UnscannableImage) as caught:
        call()
    assert caught.value.reason in UNSCANNABLE_REASONS
    return caught.value.reason


def animation(frames: list[Image.Image], fmt: str) -> bytes:
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt in ("GIF", "PNG", "WEBP"):
        params["duration"] = 40
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params)


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    image: Image.Image = skimage_photo(name)
    return image.resize(size, Image.Resampling.LANCZOS) if size else image


# --- encrypted index snapshots (test_snapshot_*.py) ---------------------------------------


ENCODER = "timm/efficientnet_lite0@sha256:0123abcd;resize=224"


# The key ring of the snapshot and crypto tests; K2 is a second key for rotation.
K1 = bytes(range(32))
K2 = bytes(range(100, 132))


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({"k1": K1}, "k1")


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


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- hash-list file formats (test_hashlists_*.py) -----------------------------------------


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


def write_list(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def sample_records() -> list[HashRecord]:
    return [
        HashRecord(1, {"pdq": PDQ_A}, 93, "POSITIVE_CLASS csam", "x:1"),
        HashRecord(2, {"md5": MD5_A, "sha1": SHA1_A, "pdq": PDQ_B}, None, "A1", "ncmec:e1"),
        HashRecord(3, {"sha256": SHA256_A}, None, "", "x:3"),
        HashRecord(4, {"md5": MD5_B}, None, "INVESTIGATION_SEED", "x:4"),
    ]


# --- key ring, key files, envelope encryption (test_crypto_*.py) --------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """A permissive umask, so a 0600 file proves the code sets the mode itself."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- python-threatexchange's vPDQ code (test_vpdq*.py, test_hma_api.py) -----------------------


@pytest.fixture
def threatexchange_vpdq(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """python-threatexchange's vpdq extension (a dev dependency). Its modules import the ``vpdq``
    C extension at the top, for hashing only; when that is not installed, an empty module stands
    in for it so the pure-Python parsing and matching can be compared with ours."""
    try:
        importlib.import_module("vpdq")
    except ImportError:
        placeholder = types.ModuleType("vpdq")
        placeholder.VpdqFeature = object  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "vpdq", placeholder)
    for name in [m for m in sys.modules if m.startswith("threatexchange.extensions.vpdq")]:
        monkeypatch.delitem(sys.modules, name)
    yield importlib.import_module("threatexchange.extensions.vpdq.vpdq")
