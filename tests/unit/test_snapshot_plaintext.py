"""Encrypted index snapshots, RELIABILITY.md E6: no plaintext reaches the disk."""

from __future__ import annotations

import builtins
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moderation.banks.payload import decode_payload, encode_payload
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    read,
    write,
)

# A 256-d float32 vector nobody would produce by accident: the E6 canary.
CANARY = np.arange(256, dtype=np.float32) * np.float32(0.1234567) + np.float32(4242.4242)


# --- E6: no plaintext on disk ---------------------------------------------------------------------


def _contains_canary(data: bytes, canary: bytes) -> bool:
    # Any 16-byte window (4 floats) of the canary counts, not only the whole vector.
    return any(canary[i : i + 16] in data for i in range(0, len(canary) - 15, 4))


def _forbid_tempfile(monkeypatch: pytest.MonkeyPatch) -> None:
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


def _spy_on_writes(monkeypatch: pytest.MonkeyPatch, canary: bytes) -> tuple[list[str], list[str]]:
    """Record every path opened for writing, and check each file for ``canary`` just before it
    is removed or renamed; returns (written, seen_before_removal)."""
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
    return written, seen_before_removal


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

    _forbid_tempfile(monkeypatch)
    written, seen_before_removal = _spy_on_writes(monkeypatch, canary)
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
