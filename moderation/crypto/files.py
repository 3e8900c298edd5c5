"""Atomic, private (mode 0600), fsynced file writes for key files and ciphertext."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def write_private_file(path: Path, parts: Iterable[bytes | bytearray | memoryview]) -> None:
    """Atomically write ``parts`` to ``path`` with mode 0600 and fsync it.

    The bytes go to a new temp file in the same directory (``O_EXCL``, mode 0600), which is
    fsynced, renamed over ``path`` with ``os.replace`` and the directory fsynced, so readers see
    the old file or the new one, never a partial file. Used for key files and ciphertext; nothing
    goes through :mod:`tempfile` or the system temp directory. ``parts`` may be a generator
    producing the content piece by piece (each piece is written before the next is requested).

    Raises:
        OSError: the directory is missing or not writable, or the disk is full (the temp file
            is removed).
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            for part in parts:
                view = memoryview(part).cast("B")
                written = 0
                while written < len(view):
                    written += handle.write(view[written:]) or 0
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` so a rename or link in it is durable (POSIX; a no-op elsewhere)."""
    # Makes the rename durable (POSIX); directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
