"""The snapshot payload codec: dtypes and shapes, zero-copy decoding, no unpickling, malformed
input, and its round trip and throughput through a snapshot.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moderation.banks import payload
from moderation.banks.payload import decode_payload, encode_payload
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    read,
    write,
)

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
