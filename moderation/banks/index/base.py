"""The signal index interface, its hit type, input validation and the serialized format.

Modelled on python-threatexchange ``threatexchange/signal_type/index.py`` (``SignalTypeIndex``:
``build``, ``add``, ``query``, ``serialize``, ``deserialize``) and
``threatexchange/signal_type/pdq/pdq_index2.py`` (FAISS behind that interface), with two
differences: entries are int64 ids (the caller maps them to bank entries), and serialization
is a JSON header plus ``faiss.serialize_index`` bytes, never pickle, because index snapshots
are loaded by workers that must not execute code found in a file.

Serialized layout (all integers big-endian)::

    b"MODSIGIX"                 8-byte magic
    uint32 header_length        bytes of the JSON header that follows
    header                      UTF-8 JSON object, see below
    section bytes ...           concatenated in the order the header lists them

The header holds ``format_version``, ``type`` (the index ``kind``), ``dim``, ``count`` (live
entries), ``params`` and ``sections``: a list of ``{"name", "length", "sha256"}``. Every
section is checked against its SHA-256 before FAISS parses it, so a truncated or corrupted
snapshot fails with :class:`ValueError` instead of reaching FAISS's reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self, TypeGuard

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

#: Version of the serialized layout; bump when the header or a section changes meaning.
FORMAT_VERSION: Final = 1

_MAGIC: Final = b"MODSIGIX"
_LENGTH = struct.Struct(">I")
# A header is a few hundred bytes; anything much larger is not one of ours.
_MAX_HEADER_BYTES: Final = 64 * 1024

ParamValue = int | float | str | bool
#: Serialized bytes, or a view of them (no copy of a gigabyte-sized index).
Buffer = bytes | bytearray | memoryview
IdArray = npt.NDArray[np.int64]

_REGISTRY: dict[str, type[SignalIndex]] = {}
_INT64_MIN: Final = int(np.iinfo(np.int64).min)
_INT64_MAX: Final = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class Hit:
    """One search result.

    ``id`` is the entry id (int64) given to ``build``/``add``. ``score`` is the cosine
    similarity (-1 to 1, higher is closer) for :class:`~moderation.banks.index.CosineIndex` and the
    Hamming distance in bits (0-256, lower is closer) for
    :class:`~moderation.banks.index.HammingIndex`.
    """

    id: int
    score: float


class SignalIndex(ABC):
    """An index of one signal type (embedding vectors or PDQ digests) keyed by int64 entry ids.

    Implementations wrap a FAISS index. Ids are non-negative and unique within an index (FAISS
    reserves -1 for "no result"). Every method validates its inputs and raises
    :class:`ValueError` with a message naming the problem; nothing is silently coerced.

    Subclasses set :attr:`kind`, the ``type`` written in the serialized header, and are
    registered under it so :func:`moderation.banks.index.load_index` can dispatch.

    Concurrent searches are safe; a mutation (``add``, ``remove``) must not run concurrently
    with anything else on the same index. Workers load a snapshot and only search it.
    """

    kind: ClassVar[str]
    #: Live entry ids, ascending; implementations keep it in step with their FAISS index.
    _ids: IdArray

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in _REGISTRY:
                raise TypeError(f"index kind {kind!r} is already registered")
            _REGISTRY[kind] = cls

    @classmethod
    @abstractmethod
    def build(cls, ids: npt.ArrayLike, vectors: npt.ArrayLike, **params: Any) -> Self:
        """Build an index from ``n`` entries.

        Args:
            ids: ``(n,)`` integer array of distinct non-negative entry ids.
            vectors: ``(n, dim)`` array; dtype and meaning are the implementation's (float32
                unit vectors for cosine, uint8 PDQ digests for Hamming). ``n`` may be 0; the
                width still fixes ``dim``.
            **params: implementation parameters (recorded in :attr:`params`).

        Raises:
            ValueError: malformed ids or vectors, or unknown/invalid parameters.
        """

    @abstractmethod
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add entries; shapes as for :meth:`build` with the index's ``dim``.

        Raises:
            ValueError: malformed input, or an id already in the index (nothing is added).
        """

    @abstractmethod
    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id; ids not in the index are ignored.

        Returns:
            The number of entries removed.

        Raises:
            ValueError: an id is not an integer.
        """

    @abstractmethod
    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Find, for each query row, at most ``k`` entries within ``threshold``.

        Args:
            queries: ``(q, dim)`` array with the same dtype rules as the index's vectors.
            k: maximum hits per query, at least 1.
            threshold: cosine similarity floor (hits have ``score >= threshold``, best first)
                or Hamming distance ceiling (hits have ``score <= threshold``, nearest first),
                depending on the implementation. Ties are ordered by id.

        Returns:
            ``q`` lists of :class:`Hit`; all empty when the index is empty.

        Raises:
            ValueError: malformed queries, ``k`` < 1 or a threshold outside the score range.
        """

    def ids(self) -> IdArray:
        """The ids of the live entries: a ``(len(self),)`` int64 copy, ascending."""
        return self._ids.copy()

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of a vector row (floats for cosine, bytes for Hamming)."""

    @property
    @abstractmethod
    def params(self) -> dict[str, ParamValue]:
        """The parameters the index was built with, as written to the serialized header."""

    def __len__(self) -> int:
        """Number of live entries."""
        return int(self._ids.size)

    def __contains__(self, entry_id: object) -> bool:
        if not isinstance(entry_id, int | np.integer) or isinstance(entry_id, bool):
            return False
        pos = int(np.searchsorted(self._ids, entry_id))
        return pos < self._ids.size and int(self._ids[pos]) == int(entry_id)

    @abstractmethod
    def _sections(self) -> dict[str, bytes]:
        """Named binary sections to serialize (at least ``"faiss"``)."""

    @classmethod
    @abstractmethod
    def _from_sections(
        cls,
        dim: int,
        count: int,
        params: Mapping[str, Any],
        sections: Mapping[str, Buffer],
    ) -> Self:
        """Rebuild from a parsed header and verified sections; ValueError if inconsistent."""

    def serialize(self) -> bytes:
        """The index as bytes: magic, JSON header, then the FAISS index and other sections.

        No pickle: :meth:`deserialize` reads nothing but JSON and FAISS's own format.
        """
        sections = self._sections()
        header = {
            "format_version": FORMAT_VERSION,
            "type": self.kind,
            "dim": self.dim,
            "count": len(self),
            "params": self.params,
            "sections": [
                {"name": name, "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                for name, blob in sections.items()
            ],
        }
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return b"".join([_MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes, *sections.values()])

    @classmethod
    def deserialize(cls, data: bytes) -> Self:
        """Read bytes written by :meth:`serialize` of the same class.

        Raises:
            ValueError: the bytes are not a serialized index, are truncated or corrupted, use
                an unknown format version, or hold another kind of index.
        """
        parsed = _parse(data)
        if parsed.kind != cls.kind:
            raise ValueError(f"serialized index is of type {parsed.kind!r}, not {cls.kind!r}")
        return cls._from_sections(parsed.dim, parsed.count, parsed.params, parsed.sections)


@dataclass(frozen=True)
class _Parsed:
    kind: str
    dim: int
    count: int
    params: dict[str, Any]
    sections: dict[str, Buffer]


def _parse(data: Buffer, *, authenticated: bool = False) -> _Parsed:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"serialized index must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    prefix = len(_MAGIC) + _LENGTH.size
    if len(view) < prefix or bytes(view[: len(_MAGIC)]) != _MAGIC:
        raise ValueError("not a serialized signal index (bad magic bytes)")
    (header_length,) = _LENGTH.unpack(view[len(_MAGIC) : prefix])
    if header_length > _MAX_HEADER_BYTES or prefix + header_length > len(view):
        raise ValueError(f"serialized index header length {header_length} is invalid")
    try:
        header = json.loads(bytes(view[prefix : prefix + header_length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"serialized index header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("serialized index header is not a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported index format version {version!r} (want {FORMAT_VERSION})")
    kind = header.get("type")
    dim = header.get("dim")
    count = header.get("count")
    params = header.get("params")
    listed = header.get("sections")
    if not isinstance(kind, str):
        raise ValueError(f"serialized index type must be a string, got {kind!r}")
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"serialized index dim must be a positive int, got {dim!r}")
    if not _is_int(count) or count < 0:
        raise ValueError(f"serialized index count must be a non-negative int, got {count!r}")
    if not isinstance(params, dict):
        raise ValueError(f"serialized index params must be an object, got {params!r}")
    if not isinstance(listed, list):
        raise ValueError("serialized index sections must be a list")
    sections: dict[str, Buffer] = {}
    offset = prefix + header_length
    for entry in listed:
        if not isinstance(entry, dict):
            raise ValueError(f"malformed section entry {entry!r}")
        name, length, digest = entry.get("name"), entry.get("length"), entry.get("sha256")
        if not isinstance(name, str) or name in sections:
            raise ValueError(f"malformed or repeated section name {name!r}")
        if not _is_int(length) or length < 0 or offset + length > len(view):
            raise ValueError(f"section {name!r} length {length!r} exceeds the data")
        # A view, not a copy: sections of large banks are gigabytes.
        blob = view[offset : offset + length]
        if not authenticated and hashlib.sha256(blob).hexdigest() != digest:
            raise ValueError(f"section {name!r} fails its SHA-256 check (corrupted data)")
        if not isinstance(digest, str):
            raise ValueError(f"section {name!r} has no SHA-256")
        sections[name] = blob
        offset += length
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} unexpected bytes after the last section")
    return _Parsed(kind, dim, count, params, sections)


def read_index(data: Buffer, *, authenticated: bool = False) -> SignalIndex:
    """Deserialize any registered index kind, dispatching on the header's ``type``.

    ``authenticated``: the caller has already verified every byte of ``data`` (an index inside
    an AES-GCM-authenticated snapshot payload), so the per-section SHA-256 checks, a full
    extra pass over gigabytes for large banks, are skipped; the structure is still checked.

    Raises:
        ValueError: as for :meth:`SignalIndex.deserialize`, or an unknown ``type``.
    """
    parsed = _parse(data, authenticated=authenticated)
    cls = _REGISTRY.get(parsed.kind)
    if cls is None:
        raise ValueError(f"unknown index type {parsed.kind!r}; known: {sorted(_REGISTRY)}")
    return cls._from_sections(parsed.dim, parsed.count, parsed.params, parsed.sections)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_ids(ids: npt.ArrayLike) -> IdArray:
    """Validate entry ids: a 1-D integer array of distinct values in ``[0, 2**63)``.

    Returns:
        ``(n,)`` int64 copy.

    Raises:
        ValueError: wrong rank or dtype, negative, too large or repeated ids.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > _INT64_MAX:
        raise ValueError("ids must fit in int64")
    if int(arr.min()) < 0:
        raise ValueError("ids must be non-negative (FAISS reserves -1 for 'no result')")
    out = arr.astype(np.int64)
    if np.unique(out).size != out.size:
        raise ValueError("ids must be distinct within one call")
    return out


def ids_from_iterable(ids: Iterable[int]) -> IdArray:
    """Ids given to ``remove``: any iterable of ints (duplicates allowed), as int64.

    Raises:
        ValueError: an element is not an integer, or is out of int64 range.
    """
    values: list[int] = []
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"ids must be integers, got {value!r}")
        if not _INT64_MIN <= int(value) <= _INT64_MAX:
            raise ValueError(f"ids must fit in int64, got {value}")
        values.append(int(value))
    return np.unique(np.asarray(values, dtype=np.int64))


def check_matrix(
    vectors: npt.ArrayLike, *, dtype: type[np.generic], dim: int | None, what: str
) -> npt.NDArray[Any]:
    """Validate a ``(n, dim)`` array of exactly ``dtype`` (no implicit casts).

    Raises:
        ValueError: wrong rank, dtype or width, or non-finite floats.
    """
    arr = np.asarray(vectors)
    if arr.dtype != dtype:
        raise ValueError(f"{what} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != 2:
        hint = " (use .reshape(1, -1) for a single row)" if arr.ndim == 1 else ""
        raise ValueError(f"{what} must be a 2-D (n, dim) array, got shape {arr.shape}{hint}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} must have {dim} columns, got {arr.shape[1]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{what} must have at least one column")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{what} row {bad} has non-finite values")
    return np.ascontiguousarray(arr)


def check_k(k: int) -> int:
    """Validate ``k`` (hits per query). Raises ValueError unless it is an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def check_threshold(threshold: float, low: float, high: float, what: str) -> float:
    """Validate a finite threshold in ``[low, high]``; raises ValueError otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number):
        raise ValueError(f"{what} threshold must be a number, got {threshold!r}")
    value = float(threshold)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{what} threshold must be in [{low}, {high}], got {threshold!r}")
    return value


def check_no_duplicates(existing: IdArray, new: IdArray) -> None:
    """Raise ValueError if any of ``new`` is already in ``existing`` (sorted ascending)."""
    if existing.size == 0 or new.size == 0:
        return
    pos = np.searchsorted(existing, new)
    pos[pos == existing.size] = 0
    clash = new[existing[pos] == new]
    if clash.size:
        shown = ", ".join(str(int(i)) for i in clash[:5])
        raise ValueError(f"{clash.size} id(s) already in the index: {shown}")


def merge_sorted(existing: IdArray, new: IdArray) -> IdArray:
    """``existing`` (sorted) plus ``new``, sorted."""
    return np.sort(np.concatenate([existing, new]))
