"""The decrypted snapshot payload: every entry's signals as arrays, and how they are
(de)serialised.

Snapshot payload (``moderation.banks.payload.encode_payload``), format 1:

======================  =================  ===============================================
array                   dtype, shape       meaning
======================  =================  ===============================================
``entry_ids``           int64 (n,)         entry primary keys
``vectors``             float32 (n, d)     unit-norm global embeddings; (n - a, d), the
                                           inactive entries' rows only, when the meta field
                                           ``vectors_in_index`` is true (below)
``pdq``                 uint8 (n, 32)      PDQ digests, ThreatExchange bit order
``pdq_quality``         uint8 (n,)         PDQ quality 0-100
``active``              bool (n,)          entry enabled and its bank enabled
``region_entry_ids``    int64 (m,)         owner entry of each region embedding
``region_vectors``      float32 (m, d)     unit-norm region embeddings (classifier stage);
                                           (0, d) when the meta field ``regions_in_file`` is
                                           true: then they are float16 rows of an encrypted
                                           row file beside the snapshot (below)
``region_file``         uint8 (b,)         with ``regions_in_file``: that row file's
                                           descriptor (name, id, data key, rows:
                                           :class:`~moderation.banks.rowfile.RowFileDescriptor`)
``cosine_index``        uint8 (b,)         optional: the active entries' cosine index,
                                           ``CosineIndex.serialize()`` bytes (its header
                                           records algorithm and parameters)
======================  =================  ===============================================

``cosine_index`` is written for banks of at least
:data:`~moderation.banks.versions.STORED_INDEX_MIN_ENTRIES` active entries, where building the
index (an HNSW graph, or for the largest banks the projection learned from the bank plus the
graph) costs far more than reading it: it is built once when the bank changes, not by every
worker at every load. Payloads without it (older snapshots, small banks) are indexed at load as
before, and so is one whose stored index does not hold exactly the entries being loaded.

With a stored index, the active entries' global embeddings are not written a second time: the
index keeps them (``ivf_pca`` and ``hnsw_pca``: as float16 codes, each component to about 5e-4
relative), and ``vectors`` holds only the inactive entries' rows, in entry order (meta
``vectors_in_index``). That drops 5,120 bytes per entry (1280-d float32 rows) from a large
bank's snapshot and from what a worker must decrypt at load. Workers read single embeddings from
the index (:meth:`~moderation.banks.blocklist.Blocklist.vector_of`); the writer decodes them all
(:meth:`Payload.full_vectors`) only when it builds the next version. Decoded float16 values
re-encode to the same codes, so vectors do not drift from version to version.

Region embeddings (five per entry: 25.6 KB at 1280-d float32, 256 GB at 10M entries) of banks
from :data:`~moderation.banks.versions.REGION_FILE_MIN_ROWS` rows are written to a row file
(:mod:`moderation.banks.rowfile`: float16, one AES-256-GCM block per row, its key inside this
payload) by :meth:`Payload.spill_regions`, and read back as a
:class:`~moderation.banks.rowfile.RowArray`: the classifier stage reads an entry's rows when it
scores that entry, and nothing else of them is in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from moderation.banks.hash_entries import HashEntries
from moderation.banks.payload import decode_payload, encode_payload
from moderation.banks.rowfile import RowArray, RowFile, RowFileDescriptor

if TYPE_CHECKING:
    from moderation.banks.index import CosineIndex

PAYLOAD_FORMAT = 1
PDQ_BYTES = 32


@dataclass(frozen=True)
class EntrySignals:
    """The signals of one new entry, computed at import before the original is discarded.

    ``vector`` is float32 (d,) unit-norm; ``pdq`` 32 bytes; ``regions`` float32 (r, d).
    """

    entry_id: int
    vector: npt.NDArray[np.float32]
    pdq: bytes
    pdq_quality: int
    regions: npt.NDArray[np.float32] | None = None


@dataclass
class Payload:
    """A decrypted snapshot payload (see the module docstring for the arrays)."""

    encoder_id: str
    dim: int
    entry_ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    pdq: npt.NDArray[np.uint8]
    pdq_quality: npt.NDArray[np.uint8]
    active: npt.NDArray[np.bool_]
    region_entry_ids: npt.NDArray[np.int64]
    region_vectors: npt.NDArray[np.float32] | RowArray
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # Serialized CosineIndex of the active entries, or None (see the module docstring).
    cosine_index: bytes | memoryview | None = None
    # True: ``vectors`` holds only the inactive entries' rows; the rest are in ``cosine_index``.
    vectors_in_index: bool = False
    # Entries from hash lists: PDQ and keyed exact hashes, no embedding.
    hashes: HashEntries = field(default_factory=HashEntries)
    # Not serialized: the snapshot's directory, where an ivf_disk index's row file lies.
    row_dir: Path | None = None
    # The region row file's descriptor until :meth:`open_regions` opens it.
    region_file: bytes | None = None

    @classmethod
    def empty(cls, encoder_id: str, dim: int) -> Payload:
        """A payload with no entries."""
        return cls(
            encoder_id=encoder_id,
            dim=dim,
            entry_ids=np.zeros(0, np.int64),
            vectors=np.zeros((0, dim), np.float32),
            pdq=np.zeros((0, PDQ_BYTES), np.uint8),
            pdq_quality=np.zeros(0, np.uint8),
            active=np.zeros(0, np.bool_),
            region_entry_ids=np.zeros(0, np.int64),
            region_vectors=np.zeros((0, dim), np.float32),
        )

    def to_bytes(self, *, index_holds_active: bool = False) -> bytes:
        """Serialise (no pickle) for encryption.

        Args:
            index_holds_active: the caller built ``cosine_index`` from exactly the active
                entries' rows of ``vectors``: only the inactive entries' rows are written (see
                the module docstring). A payload read that way is written that way again.
        """
        return encode_payload(*self.encode_parts(index_holds_active=index_holds_active))

    def encode_parts(
        self, *, index_holds_active: bool = False
    ) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        """The arrays and meta fields :meth:`to_bytes` encodes (a delta adds its own)."""
        vectors, in_index = self.vectors, self.vectors_in_index
        if not in_index and index_holds_active:
            if self.cosine_index is None:
                raise ValueError("index_holds_active needs a stored index")
            vectors, in_index = self.vectors[~self.active], True
        arrays: dict[str, np.ndarray[Any, Any]] = {
            "entry_ids": self.entry_ids,
            "vectors": vectors,
            "pdq": self.pdq,
            "pdq_quality": self.pdq_quality,
            "active": self.active,
            "region_entry_ids": self.region_entry_ids,
            "region_vectors": np.zeros((0, self.dim), np.float32)
            if isinstance(self.region_vectors, RowArray)
            else self.region_vectors,
        }
        if self.cosine_index is not None:
            arrays["cosine_index"] = np.frombuffer(self.cosine_index, dtype=np.uint8)
        region_file = self.region_file
        if isinstance(self.region_vectors, RowArray):
            region_file = self.region_vectors.rows.descriptor().to_bytes()
        if region_file is not None:
            arrays["region_vectors"] = np.zeros((0, self.dim), np.float32)
            arrays["region_file"] = np.frombuffer(region_file, dtype=np.uint8)
        arrays.update(self.hashes.arrays())
        meta = {
            "format": PAYLOAD_FORMAT,
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            **self.extra_meta,
        }
        if in_index:
            meta["vectors_in_index"] = True
        if region_file is not None:
            meta["regions_in_file"] = True
        return arrays, meta

    def spill_regions(self, path: Path) -> None:
        """Move the region embeddings to a new encrypted row file at ``path`` (float16),
        leaving a :class:`RowArray` over it. Raises RowFileError."""
        if isinstance(self.region_vectors, RowArray):
            return
        rows = RowFile.create(path, self.dim)
        for start in range(0, len(self.region_vectors), 65_536):
            rows.append(self.region_vectors[start : start + 65_536])
        rows.sync()
        self.region_vectors, self.region_file = RowArray(rows), None

    def open_regions(self, row_dir: Path) -> None:
        """Open the region row file the payload names, in ``row_dir`` (read-only; only its
        header is read). Raises RowFileError: missing, replaced or of another length."""
        if self.region_file is None:
            return
        descriptor = RowFileDescriptor.from_bytes(self.region_file)
        if descriptor.rows != len(self.region_entry_ids):
            raise ValueError("snapshot payload region arrays disagree in length")
        self.region_vectors = RowArray(RowFile.open(row_dir, descriptor, self.dim))
        self.region_file = None

    def _stored(self) -> CosineIndex:
        """The stored cosine index (``cosine_index`` must be set; every byte of it was
        authenticated with the snapshot, or built by this process).

        Raises:
            ValueError: it does not parse as a cosine index.
        """
        # FAISS is imported here, not with the module: reading a payload's hashes (the web
        # tier's hash lookup) needs no index.
        from moderation.banks.index import CosineIndex, load_index

        assert self.cosine_index is not None
        index = load_index(self.cosine_index, authenticated=True, row_dir=self.row_dir)
        if not isinstance(index, CosineIndex) or index.dim != self.dim:
            raise ValueError("the stored index is not a cosine index of the payload's width")
        return index

    def full_vectors(self) -> npt.NDArray[np.float32]:
        """Every entry's global embedding, float32 (n, d), decoding the active entries' rows
        from the stored index when the payload keeps them there (then cached: this payload
        holds full vectors from now on).

        Raises:
            ValueError: the stored index does not hold the active entries.
        """
        if not self.vectors_in_index:
            return self.vectors
        full = self.vectors_at(np.arange(len(self.entry_ids)))
        self.vectors, self.vectors_in_index = full, False
        return full

    def vectors_at(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
        """The global embeddings of the entries at positions ``rows``, float32 (k, d), without
        decoding the others: an active entry's from the stored index when the payload keeps
        them there (an ``ivf_disk`` index reads its row from its row file), an inactive one's
        from ``vectors``.

        Raises:
            ValueError: the stored index does not hold an active entry.
        """
        if not self.vectors_in_index:
            return self.vectors[rows]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        active = self.active[rows]
        inactive_rank = np.cumsum(~self.active) - 1  # row of each inactive entry in vectors
        out[~active] = self.vectors[inactive_rank[rows[~active]]]
        if active.any():
            try:
                out[active] = self._stored().reconstruct(self.entry_ids[rows[active]])
            except KeyError as exc:
                raise ValueError(f"the stored index lacks an active entry: {exc}") from exc
        return out

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Payload:
        """Parse a decrypted payload.

        Raises:
            ValueError: unknown format or inconsistent shapes.
        """
        arrays, meta = decode_payload(data)
        if "kind" in meta:
            raise ValueError(f"a {meta['kind']!r} payload, not a full snapshot's")
        return cls.from_decoded(arrays, meta)

    @classmethod
    def from_decoded(cls, arrays: dict[str, np.ndarray[Any, Any]], meta: dict[str, Any]) -> Payload:
        """Parse the arrays and meta fields of a decoded payload (see :meth:`from_bytes`)."""
        if meta.get("format") != PAYLOAD_FORMAT:
            raise ValueError(f"unknown snapshot payload format {meta.get('format')!r}")
        dim = int(meta["dim"])
        in_index = meta.get("vectors_in_index", False)
        if not isinstance(in_index, bool) or (in_index and "cosine_index" not in arrays):
            raise ValueError("vectors_in_index must be a boolean, and needs a stored index")
        payload = cls(
            encoder_id=str(meta["encoder_id"]),
            dim=dim,
            entry_ids=arrays["entry_ids"].astype(np.int64, copy=False),
            vectors=arrays["vectors"].astype(np.float32, copy=False).reshape(-1, dim),
            pdq=arrays["pdq"].astype(np.uint8, copy=False).reshape(-1, PDQ_BYTES),
            pdq_quality=arrays["pdq_quality"].astype(np.uint8, copy=False),
            active=arrays["active"].astype(np.bool_, copy=False),
            region_entry_ids=arrays["region_entry_ids"].astype(np.int64, copy=False),
            region_vectors=arrays["region_vectors"].astype(np.float32, copy=False).reshape(-1, dim),
            extra_meta={
                k: v
                for k, v in meta.items()
                if k not in {"format", "encoder_id", "dim", "vectors_in_index", "regions_in_file"}
            },
            vectors_in_index=in_index,
            hashes=HashEntries.from_arrays(arrays),
            # A view into the decrypted payload, not a copy (gigabytes for large banks).
            cosine_index=(
                arrays["cosine_index"].astype(np.uint8, copy=False).data
                if "cosine_index" in arrays
                else None
            ),
        )
        n = len(payload.entry_ids)
        rows = int((~payload.active).sum()) if in_index else n
        if not (len(payload.vectors) == rows and len(payload.pdq) == len(payload.active) == n):
            raise ValueError("snapshot payload arrays disagree in length")
        if meta.get("regions_in_file") is True and "region_file" in arrays:
            payload.region_file = arrays["region_file"].tobytes()
        elif len(payload.region_entry_ids) != len(payload.region_vectors):
            raise ValueError("snapshot payload region arrays disagree in length")
        return payload

    def without(self, removed: Iterable[int]) -> Payload:
        """A copy without the entries in ``removed`` (and their regions)."""
        removed_ids = np.fromiter(removed, dtype=np.int64)
        vectors = self.full_vectors()
        keep = ~np.isin(self.entry_ids, removed_ids)
        keep_regions = ~np.isin(self.region_entry_ids, removed_ids)
        return Payload(
            encoder_id=self.encoder_id,
            dim=self.dim,
            entry_ids=self.entry_ids[keep],
            vectors=vectors[keep],
            pdq=self.pdq[keep],
            pdq_quality=self.pdq_quality[keep],
            active=self.active[keep],
            region_entry_ids=self.region_entry_ids[keep_regions],
            region_vectors=self.region_vectors[keep_regions],
            extra_meta=dict(self.extra_meta),
            hashes=self.hashes.without(removed_ids.tolist()),
        )

    def with_added(self, signals: Sequence[EntrySignals]) -> Payload:
        """A copy with new entries appended (active)."""
        if not signals:
            return self
        existing = self.full_vectors()
        vectors = np.stack([s.vector for s in signals]).astype(np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, snapshot {self.dim}")
        regions = [
            (s.entry_id, s.regions) for s in signals if s.regions is not None and len(s.regions)
        ]
        region_ids = (
            np.concatenate([np.full(len(r), eid, np.int64) for eid, r in regions])
            if regions
            else np.zeros(0, np.int64)
        )
        region_vecs = (
            np.concatenate([r for _, r in regions]).astype(np.float32)
            if regions
            else np.zeros((0, self.dim), np.float32)
        )
        return Payload(
            encoder_id=self.encoder_id,
            dim=self.dim,
            entry_ids=np.concatenate([self.entry_ids, [s.entry_id for s in signals]]).astype(
                np.int64
            ),
            vectors=np.concatenate([existing, vectors]),
            pdq=np.concatenate(
                [self.pdq, np.stack([np.frombuffer(s.pdq, np.uint8) for s in signals])]
            ),
            pdq_quality=np.concatenate(
                [self.pdq_quality, np.array([s.pdq_quality for s in signals], np.uint8)]
            ),
            active=np.concatenate([self.active, np.ones(len(signals), np.bool_)]),
            region_entry_ids=np.concatenate([self.region_entry_ids, region_ids]),
            region_vectors=np.concatenate([np.asarray(self.region_vectors), region_vecs]),
            extra_meta=dict(self.extra_meta),
            hashes=self.hashes,
        )
