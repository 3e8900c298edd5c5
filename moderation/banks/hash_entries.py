"""Entries without an image: the signals of hash-list entries inside the snapshot payload.

A bank filled from a hash list (:mod:`moderation.banks.hash_import`) gets entries that carry a
PDQ digest, exact hashes, or both, and no embedding. They live in the payload beside the image
entries, in these arrays (all optional: a payload written before hash lists has none):

=======================  =================  ============================================
array                    dtype, shape       meaning
=======================  =================  ============================================
``hash_entry_ids``       int64 (h,)         entry primary keys
``hash_pdq``             uint8 (h, 32)      PDQ digests, ThreatExchange bit order
``hash_pdq_quality``     uint8 (h,)         quality 0-100, :data:`UNKNOWN_QUALITY` if the
                                            list did not say
``hash_has_pdq``         bool (h,)          the entry has a PDQ digest (else only exact)
``hash_active``          bool (h,)          entry enabled and its bank enabled
``exact_entry_ids``      int64 (x,)         owner entry of each exact hash
``exact_kinds``          uint8 (x,)         index into :data:`~moderation.signals.exact.EXACT_KINDS`
``exact_keyed``          uint8 (x, 32)      HMAC-SHA256 keyed digest (never the digest)
``exact_sealed``         uint8 (x, 60)      the digest sealed for export: AES-256-GCM
                                            nonce 12 + ciphertext 32 (zero-padded) + tag 16
``vpdq_entry_ids``       int64 (v,)         owner entry of each vPDQ frame (in list order)
``vpdq_pdq``             uint8 (v, 32)      the frame's PDQ digest
``vpdq_quality``         uint8 (v,)         the frame's PDQ quality, 0-100
``vpdq_timestamps``      float64 (v,)       the frame's time, seconds
=======================  =================  ============================================

A vPDQ entry (a video's signature from a hash list, :mod:`moderation.signals.vpdq`) has no
PDQ digest of its own (``hash_has_pdq`` false) and one ``vpdq_*`` row per frame, in the order
of its signal; the four ``vpdq_*`` arrays are written only when some entry has frames, so
payloads without vPDQ entries are byte-identical to those written before them.

The snapshot is encrypted as a whole; the exact hashes are keyed as well, so a worker that has
decrypted the snapshot still holds no list of banned files, only values it can compare an
upload's keyed digests with (:mod:`moderation.signals.exact`).
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moderation.crypto.aead import NONCE_BYTES, TAG_BYTES, decrypt
from moderation.signals.exact import DIGEST_BYTES, EXACT_KINDS, KEYED_BYTES, keyed
from moderation.signals.vpdq import VpdqFeature

PDQ_BYTES: Final = 32
#: ``hash_pdq_quality`` of a digest whose list gave no quality.
UNKNOWN_QUALITY: Final = 255
#: Width of a sealed digest: nonce, the digest zero-padded to 32 bytes, GCM tag.
SEALED_BYTES: Final = NONCE_BYTES + 32 + TAG_BYTES


@dataclass(frozen=True)
class ExactSignal:
    """One exact hash of an entry: its kind, keyed form (32 bytes) and sealed form (60)."""

    kind: str
    keyed: bytes
    sealed: bytes


class ExactSealer:
    """Turns raw exact digests into :class:`ExactSignal`: keyed with HMAC-SHA256 under
    ``hmac_key`` (:func:`moderation.signals.exact.keyed`) and sealed with AES-256-GCM under
    ``export_key`` (the kind as associated data; one AES context for every digest, since the
    key schedule would otherwise dominate a million-line import)."""

    def __init__(self, hmac_key: bytes, export_key: bytes) -> None:
        self.hmac_key = hmac_key
        self._aead = AESGCM(export_key)

    def signal(self, kind: str, digest: bytes) -> ExactSignal:
        """The keyed and sealed forms of one digest of ``kind``.

        Raises:
            ValueError: unknown kind or a digest of the wrong size.
        """
        nonce = os.urandom(NONCE_BYTES)
        padded = digest.ljust(32, b"\x00")
        sealed = nonce + self._aead.encrypt(nonce, padded, kind.encode())
        return ExactSignal(kind, keyed(self.hmac_key, kind, digest), sealed)


def open_digest(export_key: bytes, kind: str, sealed: bytes) -> bytes:
    """Inverse of :meth:`ExactSealer.signal`'s sealing: the raw digest of ``kind``.

    Raises:
        moderation.crypto.errors.DecryptionError: wrong key or altered bytes.
    """
    padded = decrypt(sealed, export_key, kind.encode(), context=f"a sealed {kind} hash")
    return padded[: DIGEST_BYTES[kind]]


#: Payload array name of each :class:`HashEntries` field.
_ARRAY_NAMES: Final = {
    "entry_ids": "hash_entry_ids",
    "pdq": "hash_pdq",
    "pdq_quality": "hash_pdq_quality",
    "has_pdq": "hash_has_pdq",
    "active": "hash_active",
    "exact_entry_ids": "exact_entry_ids",
    "exact_kinds": "exact_kinds",
    "exact_keyed": "exact_keyed",
    "exact_sealed": "exact_sealed",
    "vpdq_entry_ids": "vpdq_entry_ids",
    "vpdq_pdq": "vpdq_pdq",
    "vpdq_quality": "vpdq_quality",
    "vpdq_timestamps": "vpdq_timestamps",
}
#: The fields that are per vPDQ frame (optional in a payload).
_VPDQ_FIELDS: Final = ("vpdq_entry_ids", "vpdq_pdq", "vpdq_quality", "vpdq_timestamps")


def _empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray[Any, Any]:
    return np.zeros(shape, dtype)


@dataclass
class HashEntries:
    """The hash-list entries of one payload (see the module docstring for the arrays)."""

    entry_ids: npt.NDArray[np.int64] = field(default_factory=lambda: _empty((0,), np.int64))
    pdq: npt.NDArray[np.uint8] = field(default_factory=lambda: _empty((0, PDQ_BYTES), np.uint8))
    pdq_quality: npt.NDArray[np.uint8] = field(default_factory=lambda: _empty((0,), np.uint8))
    has_pdq: npt.NDArray[np.bool_] = field(default_factory=lambda: _empty((0,), np.bool_))
    active: npt.NDArray[np.bool_] = field(default_factory=lambda: _empty((0,), np.bool_))
    exact_entry_ids: npt.NDArray[np.int64] = field(default_factory=lambda: _empty((0,), np.int64))
    exact_kinds: npt.NDArray[np.uint8] = field(default_factory=lambda: _empty((0,), np.uint8))
    exact_keyed: npt.NDArray[np.uint8] = field(
        default_factory=lambda: _empty((0, KEYED_BYTES), np.uint8)
    )
    exact_sealed: npt.NDArray[np.uint8] = field(
        default_factory=lambda: _empty((0, SEALED_BYTES), np.uint8)
    )
    vpdq_entry_ids: npt.NDArray[np.int64] = field(default_factory=lambda: _empty((0,), np.int64))
    vpdq_pdq: npt.NDArray[np.uint8] = field(
        default_factory=lambda: _empty((0, PDQ_BYTES), np.uint8)
    )
    vpdq_quality: npt.NDArray[np.uint8] = field(default_factory=lambda: _empty((0,), np.uint8))
    vpdq_timestamps: npt.NDArray[np.float64] = field(
        default_factory=lambda: _empty((0,), np.float64)
    )

    def __len__(self) -> int:
        return len(self.entry_ids)

    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        """The payload arrays, by name (none when there are no hash entries, so payloads
        without them stay byte-identical to those written before hash lists)."""
        if not len(self.entry_ids):
            return {}
        skip = () if len(self.vpdq_entry_ids) else _VPDQ_FIELDS
        return {_ARRAY_NAMES[k]: v for k, v in self.arrays_full().items() if k not in skip}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray[Any, Any]]) -> HashEntries:
        """Read them back from a decoded payload (absent arrays: no hash entries).

        Raises:
            ValueError: arrays that disagree in length or width.
        """
        if "hash_entry_ids" not in arrays:
            return cls()
        entries = cls(
            entry_ids=arrays["hash_entry_ids"].astype(np.int64, copy=False),
            pdq=arrays["hash_pdq"].astype(np.uint8, copy=False).reshape(-1, PDQ_BYTES),
            pdq_quality=arrays["hash_pdq_quality"].astype(np.uint8, copy=False),
            has_pdq=arrays["hash_has_pdq"].astype(np.bool_, copy=False),
            active=arrays["hash_active"].astype(np.bool_, copy=False),
            exact_entry_ids=arrays["exact_entry_ids"].astype(np.int64, copy=False),
            exact_kinds=arrays["exact_kinds"].astype(np.uint8, copy=False),
            exact_keyed=arrays["exact_keyed"].astype(np.uint8, copy=False).reshape(-1, 32),
            exact_sealed=arrays["exact_sealed"]
            .astype(np.uint8, copy=False)
            .reshape(-1, SEALED_BYTES),
            **_vpdq_arrays(arrays),
        )
        n, x = len(entries.entry_ids), len(entries.exact_entry_ids)
        if not (len(entries.pdq) == len(entries.pdq_quality) == len(entries.has_pdq) == n):
            raise ValueError("snapshot payload hash-entry arrays disagree in length")
        if not (len(entries.active) == n and len(entries.exact_kinds) == x):
            raise ValueError("snapshot payload hash-entry arrays disagree in length")
        if not (len(entries.exact_keyed) == len(entries.exact_sealed) == x):
            raise ValueError("snapshot payload exact-hash arrays disagree in length")
        if x and int(entries.exact_kinds.max()) >= len(EXACT_KINDS):
            raise ValueError("snapshot payload names an unknown exact-hash kind")
        v = len(entries.vpdq_entry_ids)
        if not (
            len(entries.vpdq_pdq) == len(entries.vpdq_quality) == len(entries.vpdq_timestamps) == v
        ):
            raise ValueError("snapshot payload vPDQ arrays disagree in length")
        return entries

    def exact_owners(self, keep: Container[int]) -> dict[tuple[int, bytes], list[int]]:
        """(index into :data:`~moderation.signals.exact.EXACT_KINDS`, keyed digest) -> the
        entries in ``keep`` that hold that exact hash."""
        owners: dict[tuple[int, bytes], list[int]] = {}
        for kind, keyed_digest, eid in zip(
            self.exact_kinds.tolist(), self.exact_keyed, self.exact_entry_ids.tolist(), strict=True
        ):
            if eid in keep:
                owners.setdefault((kind, keyed_digest.tobytes()), []).append(eid)
        return owners

    def without(self, removed: Iterable[int]) -> HashEntries:
        """A copy without the entries in ``removed``."""
        removed_ids = np.fromiter(removed, dtype=np.int64)
        keep = ~np.isin(self.entry_ids, removed_ids)
        keep_exact = ~np.isin(self.exact_entry_ids, removed_ids)
        keep_vpdq = ~np.isin(self.vpdq_entry_ids, removed_ids)
        return HashEntries(
            entry_ids=self.entry_ids[keep],
            pdq=self.pdq[keep],
            pdq_quality=self.pdq_quality[keep],
            has_pdq=self.has_pdq[keep],
            active=self.active[keep],
            exact_entry_ids=self.exact_entry_ids[keep_exact],
            exact_kinds=self.exact_kinds[keep_exact],
            exact_keyed=self.exact_keyed[keep_exact],
            exact_sealed=self.exact_sealed[keep_exact],
            vpdq_entry_ids=self.vpdq_entry_ids[keep_vpdq],
            vpdq_pdq=self.vpdq_pdq[keep_vpdq],
            vpdq_quality=self.vpdq_quality[keep_vpdq],
            vpdq_timestamps=self.vpdq_timestamps[keep_vpdq],
        )

    def with_added(self, added: HashEntries) -> HashEntries:
        """A copy with ``added``'s entries appended (as they are in ``added``)."""
        if not len(added.entry_ids):
            return self
        mine, theirs = self.arrays_full(), added.arrays_full()
        return HashEntries(**{k: np.concatenate([mine[k], theirs[k]]) for k in mine})

    def arrays_full(self) -> dict[str, np.ndarray[Any, Any]]:
        """Every array by field name (also when empty)."""
        return {
            "entry_ids": self.entry_ids,
            "pdq": self.pdq,
            "pdq_quality": self.pdq_quality,
            "has_pdq": self.has_pdq,
            "active": self.active,
            "exact_entry_ids": self.exact_entry_ids,
            "exact_kinds": self.exact_kinds,
            "exact_keyed": self.exact_keyed,
            "exact_sealed": self.exact_sealed,
            "vpdq_entry_ids": self.vpdq_entry_ids,
            "vpdq_pdq": self.vpdq_pdq,
            "vpdq_quality": self.vpdq_quality,
            "vpdq_timestamps": self.vpdq_timestamps,
        }

    def vpdq_frames(self, entry_id: int) -> list[VpdqFeature]:
        """The vPDQ frames of one entry, in its signal's order (empty: not a vPDQ entry)."""
        rows = np.flatnonzero(self.vpdq_entry_ids == entry_id)
        return [
            VpdqFeature(
                position,
                int(self.vpdq_quality[row]),
                self.vpdq_pdq[row].tobytes().hex(),
                float(self.vpdq_timestamps[row]),
            )
            for position, row in enumerate(rows.tolist())
        ]

    def exact_rows(self, entry_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
        """Row numbers of the exact hashes owned by ``entry_ids``."""
        return np.flatnonzero(np.isin(self.exact_entry_ids, entry_ids))


def _vpdq_arrays(arrays: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """The ``vpdq_*`` arrays of a decoded payload (absent in one without vPDQ entries)."""
    if "vpdq_entry_ids" not in arrays:
        return {}
    return {
        "vpdq_entry_ids": arrays["vpdq_entry_ids"].astype(np.int64, copy=False),
        "vpdq_pdq": arrays["vpdq_pdq"].astype(np.uint8, copy=False).reshape(-1, PDQ_BYTES),
        "vpdq_quality": arrays["vpdq_quality"].astype(np.uint8, copy=False),
        "vpdq_timestamps": arrays["vpdq_timestamps"].astype(np.float64, copy=False),
    }


def rows_of(values: Sequence[bytes], width: int) -> npt.NDArray[np.uint8]:
    """Equal-length byte strings as a uint8 (len(values), width) array."""
    if not values:
        return np.zeros((0, width), np.uint8)
    return np.frombuffer(b"".join(values), np.uint8).reshape(len(values), width)
