"""Shared helpers of the unit tests, by the topic whose files use them: random unit vectors and
ids (``test_index_*.py``); photos, image comparison and unscannable reasons (``test_imaging_*.py``);
the key ring, payloads and file surgery of the snapshot tests (``test_snapshot_*.py``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import encode
from PIL import Image

from moderation.banks import snapshot_header
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


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)
