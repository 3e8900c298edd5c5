"""Encrypted row files: float16 vectors kept on disk, one AES-256-GCM block per row, read and
decrypted only for the rows a query needs (the ``ivf_disk`` cosine index's re-ranking rows,
and the classifier stage's region embeddings of large banks).

File layout::

    magic       8 bytes   b"MODROWS\\x00"
    file_id     16 bytes  random, fixed at creation
    dim         4 bytes   big-endian uint32, floats per row
    reserved    4 bytes   zero
    blocks      one per row, in row order: AES-256-GCM ciphertext of the row's ``dim``
                float16 values (little-endian), then its 16-byte tag

Each file has its own random 256-bit data key. The key never reaches the disk in clear: it is
kept in :meth:`RowFile.descriptor`, which the owning index serializes into the snapshot payload,
so the snapshot's envelope (AES-GCM under a data key wrapped by the master key,
:mod:`moderation.banks.snapshot`) protects it. Row ``i``'s nonce is ``file_id[:4] || i``
(8 bytes, big-endian): unique within the file, whose key is used for no other file (NIST SP
800-38D section 8.2.1, deterministic construction). The associated data is the file id, so a
block moved to another position or file fails its tag, as does a row file of another snapshot
version (another key). Rows are only ever appended, never rewritten in place, and only by the
process that created the file; a file opened from a snapshot is read-only.

One block per row because queries read scattered rows (``k x k_factor`` candidates in
different places): a larger block would be read and decrypted in full for one of its rows.
The cost is 16 bytes per row (0.6% of a 1280-d float16 row) and one AES-GCM call per row read
(about 3 us for 2.5 KB on the 2-core development machine).
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC: Final = b"MODROWS\x00"
_HEADER: Final = struct.Struct(">8s16sII")
HEADER_BYTES: Final = _HEADER.size
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
FILE_ID_BYTES: Final = 16
_DESCRIPTOR: Final = struct.Struct(">16s32sQ")
#: Rows decrypted per sequential read in :meth:`RowFile.read_range` (about 10 MB at 1280-d).
RANGE_ROWS: Final = 4096


class RowFileError(ValueError):
    """A row file is missing, malformed, truncated, or a block fails authentication (tampered
    bytes, another file's or version's rows, or a wrong key). The message names the file."""


@dataclass(frozen=True)
class RowFileDescriptor:
    """What opens a row file: its name (relative to the row directory), id, key and rows.

    ``to_bytes`` holds the data key: it belongs inside an encrypted snapshot payload only."""

    name: str
    file_id: bytes
    key: bytes
    rows: int

    def to_bytes(self) -> bytes:
        """``file_id (16) || key (32) || rows (8, big-endian) || name (UTF-8)``."""
        return _DESCRIPTOR.pack(self.file_id, self.key, self.rows) + self.name.encode()

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> Self:
        """Inverse of :meth:`to_bytes`. Raises RowFileError when malformed."""
        data = bytes(blob)
        if len(data) <= _DESCRIPTOR.size:
            raise RowFileError("row file descriptor is truncated")
        file_id, key, rows = _DESCRIPTOR.unpack(data[: _DESCRIPTOR.size])
        name = data[_DESCRIPTOR.size :].decode("utf-8", errors="strict")
        if "/" in name or name in {".", ".."}:
            raise RowFileError(f"row file name {name!r} is not a plain file name")
        return cls(name, file_id, key, rows)


class RowFile:
    """Float16 rows of width ``dim`` in an encrypted file (see the module docstring)."""

    def __init__(self, path: Path, descriptor: RowFileDescriptor, dim: int, *, writable: bool):
        """Use :meth:`create` or :meth:`open`."""
        self.path = path
        self.dim = dim
        self._file_id = descriptor.file_id
        self._key = descriptor.key
        self._aead = AESGCM(descriptor.key)
        self._rows = descriptor.rows
        self._writable = writable
        self._block = dim * 2 + TAG_BYTES
        self._fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    @classmethod
    def create(cls, path: Path, dim: int) -> Self:
        """A new, empty row file at ``path`` (mode 0600; an existing file is refused) under a
        fresh random key. Raises RowFileError when it cannot be created."""
        file_id = secrets.token_bytes(FILE_ID_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, _HEADER.pack(MAGIC, file_id, dim, 0))
            finally:
                os.close(fd)
        except OSError as exc:
            raise RowFileError(f"row file {path}: cannot create: {exc}") from exc
        key = secrets.token_bytes(KEY_BYTES)
        return cls(path, RowFileDescriptor(path.name, file_id, key, 0), dim, writable=True)

    @classmethod
    def open(cls, directory: Path, descriptor: RowFileDescriptor, dim: int) -> Self:
        """Open an existing row file read-only, checking its header and length (no block is
        read). Raises RowFileError."""
        path = Path(directory) / descriptor.name
        try:
            with path.open("rb") as handle:
                header = handle.read(HEADER_BYTES)
                size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise RowFileError(f"row file {path}: cannot open: {exc.strerror}") from exc
        if len(header) != HEADER_BYTES:
            raise RowFileError(f"row file {path}: truncated header")
        magic, file_id, width, _ = _HEADER.unpack(header)
        if magic != MAGIC or file_id != descriptor.file_id or width != dim:
            raise RowFileError(
                f"row file {path}: not the row file this index was written with (another "
                "snapshot version's, or replaced)"
            )
        if size < HEADER_BYTES + descriptor.rows * (dim * 2 + TAG_BYTES):
            raise RowFileError(f"row file {path}: truncated ({size} bytes)")
        return cls(path, descriptor, dim, writable=False)

    def __len__(self) -> int:
        return self._rows

    @property
    def writable(self) -> bool:
        """True for a file this process created (rows can be appended)."""
        return self._writable

    def descriptor(self) -> RowFileDescriptor:
        """Name, id, key and row count: what :meth:`open` needs (holds the key)."""
        return RowFileDescriptor(self.path.name, self._file_id, self._key, self._rows)

    def _nonce(self, row: int) -> bytes:
        return self._file_id[:4] + row.to_bytes(8, "big")

    def append(self, vectors: npt.NDArray[np.float32]) -> None:
        """Encrypt float32 ``(n, dim)`` rows as float16 and append them. Raises RowFileError
        on a read-only file or a write error."""
        if not self._writable:
            raise RowFileError(f"row file {self.path}: opened from a snapshot, read-only")
        half = np.ascontiguousarray(vectors, dtype="<f2")
        start = self._rows
        blob = b"".join(
            self._aead.encrypt(self._nonce(start + i), row.tobytes(), self._file_id)
            for i, row in enumerate(half)
        )
        try:
            os.pwrite(self._fd, blob, HEADER_BYTES + start * self._block)
        except OSError as exc:
            raise RowFileError(f"row file {self.path}: cannot write: {exc}") from exc
        self._rows += len(half)

    def sync(self) -> None:
        """fsync the rows written so far."""
        os.fsync(self._fd)

    def _decrypt(self, row: int, block: bytes) -> bytes:
        if len(block) != self._block:
            raise RowFileError(f"row file {self.path}: short read at row {row}")
        try:
            return self._aead.decrypt(self._nonce(row), block, self._file_id)
        except InvalidTag:
            raise RowFileError(
                f"row file {self.path}: row {row} fails authentication (tampered, another "
                "version's file, or the wrong key)"
            ) from None

    def read(self, rows: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Rows at the given positions, float32 ``(len(rows), dim)``; each is read with one
        ``os.pread`` (no mapping: the page cache holds what was read, the process does not).

        Raises:
            RowFileError: a position outside the file, or a block that fails authentication
                (a short read included).
        """
        positions = np.asarray(rows, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self._rows):
            raise RowFileError(f"row file {self.path}: position outside its {self._rows} rows")
        # The per-row loop is the query's hot path (k x k_factor rows): locals, no helpers.
        block, fd, file_id, decrypt = self._block, self._fd, self._file_id, self._aead.decrypt
        prefix = file_id[:4]
        wanted = positions.tolist()
        # Ask the kernel for every row first, so the reads of rows not in the page cache are
        # in flight together instead of one after another (measured on 320 cold rows here:
        # p50 5-8 ms instead of 30-40 ms; 0.2 ms more when every row is cached).
        for row in wanted:
            os.posix_fadvise(fd, HEADER_BYTES + row * block, block, os.POSIX_FADV_WILLNEED)
        plain = []
        for row in wanted:
            data = os.pread(fd, block, HEADER_BYTES + row * block)
            try:
                plain.append(decrypt(prefix + row.to_bytes(8, "big"), data, file_id))
            except InvalidTag:
                self._decrypt(row, data)  # raises RowFileError naming the row
        half = np.frombuffer(b"".join(plain), dtype="<f2").reshape(-1, self.dim)
        return half.astype(np.float32)

    def read_range(self, start: int, count: int) -> npt.NDArray[np.float32]:
        """Rows ``start`` .. ``start + count - 1``, float32 ``(count, dim)``, read sequentially
        (for rebuilding and exact scans). Raises RowFileError as :meth:`read`."""
        if start < 0 or count < 0 or start + count > self._rows:
            raise RowFileError(f"row file {self.path}: range outside its {self._rows} rows")
        block = self._block
        out = np.empty((count, self.dim), dtype=np.float32)
        for first in range(0, count, RANGE_ROWS):
            n = min(RANGE_ROWS, count - first)
            data = os.pread(self._fd, n * block, HEADER_BYTES + (start + first) * block)
            if len(data) != n * block:
                raise RowFileError(f"row file {self.path}: short read at row {start + first}")
            plain = b"".join(
                self._decrypt(start + first + i, data[i * block : (i + 1) * block])
                for i in range(n)
            )
            out[first : first + n] = np.frombuffer(plain, dtype="<f2").reshape(n, self.dim)
        return out

    def close(self) -> None:
        """Close the file descriptor (the object is unusable afterwards)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)


class RowArray:
    """A read-only float32 ``(len(rows), dim)`` array over a :class:`RowFile`: indexing reads
    and decrypts only the rows asked for (an int, a slice, an int array or a boolean mask, as
    numpy indexes the first axis); ``np.asarray`` reads them all. Values are the stored
    float16 widened (relative error at most 2**-11 per component)."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, rows: RowFile) -> None:
        self.rows = rows

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)``."""
        return (len(self.rows), self.rows.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: object) -> npt.NDArray[np.float32]:
        n = len(self.rows)
        if isinstance(key, int | np.integer):
            row: npt.NDArray[np.float32] = self.rows.read([int(key) % n if n else int(key)])[0]
            return row
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self.rows.read_range(start, max(0, stop - start))
            return self.rows.read(np.arange(start, stop, step))
        index = np.asarray(key)
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise IndexError(f"boolean index of shape {index.shape} for {n} rows")
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError(f"unsupported row index {key!r}")
        return self.rows.read(np.where(index < 0, index + n, index))

    def __array__(self, dtype: Any = None, copy: object = None) -> npt.NDArray[Any]:
        whole = self.rows.read_range(0, len(self.rows))
        return whole if dtype is None else whole.astype(dtype)
