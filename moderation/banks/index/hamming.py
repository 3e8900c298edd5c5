"""Hamming-distance index over 256-bit PDQ digests: FAISS exact scan or multi-index hashing.

python-threatexchange ``signal_type/pdq/pdq_index2.py`` stores PDQ bits as 256 floats in
``IndexFlatL2`` and uses ``range_search``; a binary index holds the 32-byte digests as they are
(32 bytes per entry instead of 1 KiB) and computes Hamming distance with popcount.

Two algorithms, both exact for every threshold:

``flat``
    ``IndexBinaryFlat`` in an ``IndexBinaryIDMap``: a linear scan, 32 MB per query at a
    million entries.
``mih``
    Multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with
    Multi-Index Hashing", CVPR 2012), as python-threatexchange
    ``signal_type/pdq/pdq_faiss_matcher.py`` ``PDQMultiHashIndex`` uses it: FAISS
    ``IndexBinaryMultiHash`` cuts each digest into ``nhash`` chunks of ``256 / nhash`` bits,
    each the key of a hash table, and a query probes every chunk's key with up to ``nflip``
    bits flipped, then checks the full distance of each candidate. By pigeonhole a digest at
    distance ``d < nhash * (nflip + 1)`` differs from the query by at most ``nflip`` bits in
    some chunk, so choosing ``nflip = floor(threshold) // nhash`` finds every hit: with 16
    chunks of 16 bits, one flip covers the PDQ threshold of 31 bits. Thresholds that would
    need more than :data:`MIH_MAX_NFLIP` flips scan the stored digests instead.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Self

import faiss
import numpy as np
import numpy.typing as npt

from moderation.banks.index.base import (
    Buffer,
    Hit,
    IdArray,
    ParamValue,
    SignalIndex,
    check_ids,
    check_k,
    check_matrix,
    check_no_duplicates,
    check_threshold,
    ids_from_iterable,
    merge_sorted,
)
from moderation.signals.pdq import PDQ_BITS, PDQ_DIGEST_BYTES

logger = logging.getLogger(__name__)

Algorithm = Literal["flat", "mih"]

#: Bank size (entries) from which ``build(algorithm="auto")`` uses multi-index hashing
#: (``run_hamming_benchmark``, independent fair bits, the shared 2-core development machine
#: under load). With FAISS's default OpenMP threads a single-query scan waits at thread
#: barriers for a busy core: its p99 at radius 31 was 32-40 ms from 20k entries up and its p50
#: 41 ms at 1M, while the hash tables, searched by one thread, gave p99 0.2 ms at 20k, 4 ms at
#: 50k and 100k and p50 1.9 ms at 1M. One-thread scans are steadier (p50 0.3 ms at 100k, 2.6 ms
#: at 1M) but still grow linearly. Against that, the tables cost about 370 bytes and 10 us of
#: build time per entry (48 bytes and 1.7 us for the scan), so small banks keep the scan.
MIH_MIN_ENTRIES: Final = 50_000

#: Hash tables (digest chunks) for ``mih``: 16 chunks of 16 bits, python-threatexchange's
#: ``PDQMultiHashIndex`` default. 16-bit keys give about ``n / 65536`` entries per bucket (15 at
#: a million), and one flip per chunk (17 probes per chunk) covers radius 31 exactly.
MIH_NHASH: Final = 16
#: Chunk counts accepted for ``nhash``: divisors of 256 whose chunks fit a 64-bit hash key.
MIH_NHASH_CHOICES: Final = (4, 8, 16, 32)

#: Most flipped bits per chunk before a query falls back to scanning the stored digests. The
#: probes per chunk grow as ``sum(C(b, i) for i <= nflip)``: with 16-bit chunks 17 for one flip
#: and 137 for two, each bringing back about ``n / 65536`` candidates. At 1M entries (one
#: thread) one flip took 2.0 ms per query (p50), two flips 51 ms against 6.7 ms for the scan;
#: so radius 31 uses the hash tables and wider radii (52 for some callers) scan.
MIH_MAX_NFLIP: Final = 1

#: ``IndexBinaryMultiHash`` cannot delete. Removed entries stay in it, marked dead (label -1)
#: and dropped from results; once they exceed this fraction of the stored entries the hash
#: tables are rebuilt from the live digests. Dead entries cost memory and verification work
#: only, so the fraction matches the cosine HNSW tombstone rule.
MIH_COMPACT_FRACTION: Final = 0.2

_DEAD: Final = -1
_FLAT_PARAMS: Final[dict[str, ParamValue]] = {"algorithm": "flat", "bits": PDQ_BITS}
#: Header of indexes written before ``algorithm`` was recorded: always flat.
_LEGACY_PARAMS: Final = {"bits": PDQ_BITS}


class HammingIndex(SignalIndex):
    """Hamming distance over uint8 ``(n, 32)`` PDQ digests; ``Hit.score`` is distance in bits."""

    kind = "hamming"

    def __init__(self, *, algorithm: Algorithm = "flat", nhash: int = MIH_NHASH) -> None:
        """An empty index of 32-byte (256-bit) digests; see :meth:`build` for the parameters."""
        if algorithm not in ("flat", "mih"):
            raise ValueError(f"algorithm must be 'flat' or 'mih', got {algorithm!r}")
        if isinstance(nhash, bool) or nhash not in MIH_NHASH_CHOICES:
            raise ValueError(f"nhash must be one of {MIH_NHASH_CHOICES}, got {nhash!r}")
        self._algorithm: Algorithm = algorithm
        self._nhash = int(nhash)
        self._index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(PDQ_BITS))
        # ``Any``: the FAISS stubs lack IndexBinaryMultiHash's fields (nflip, storage, ...).
        self._mih: Any = faiss.IndexBinaryMultiHash(PDQ_BITS, self._nhash, PDQ_BITS // self._nhash)
        # mih: the id of each stored position, -1 once removed.
        self._labels: IdArray = np.empty(0, dtype=np.int64)
        self._dead = 0
        # ``nflip`` is a field of the FAISS index: setting it and searching must not interleave.
        self._mih_lock = threading.Lock()
        self._ids: IdArray = np.empty(0, dtype=np.int64)

    @classmethod
    def build(
        cls,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        algorithm: Algorithm | Literal["auto"] = "auto",
        nhash: int = MIH_NHASH,
        **params: Any,
    ) -> Self:
        """Build from ``(n,)`` int ids and ``(n, 32)`` uint8 digests.

        Args:
            algorithm: ``"flat"`` (linear scan), ``"mih"`` (multi-index hashing) or ``"auto"``:
                ``mih`` when ``n >= MIH_MIN_ENTRIES``, else flat. Both are exact. The choice is
                fixed for the index's life; later additions do not switch it.
            nhash: ``mih`` hash tables (one of :data:`MIH_NHASH_CHOICES`), recorded in the
                header.

        Raises:
            ValueError: malformed input (see :class:`SignalIndex`) or an unknown or invalid
                parameter.
        """
        if params:
            raise ValueError(f"unknown HammingIndex parameter(s): {sorted(params)}")
        if algorithm == "auto":
            rows = np.shape(vectors)[0] if np.ndim(vectors) else 0
            algorithm = "mih" if rows >= MIH_MIN_ENTRIES else "flat"
        index = cls(algorithm=algorithm, nhash=nhash)
        index.add(ids, vectors)
        return index

    @property
    def dim(self) -> int:
        """Digest width in bytes (32)."""
        return PDQ_DIGEST_BYTES

    @property
    def algorithm(self) -> Algorithm:
        """``"flat"`` or ``"mih"``."""
        return self._algorithm

    @property
    def params(self) -> dict[str, ParamValue]:
        """``algorithm``, ``bits`` (digest width, 256) and, for ``mih``, ``nhash``."""
        if self._algorithm == "flat":
            return dict(_FLAT_PARAMS)
        return {"algorithm": "mih", "bits": PDQ_BITS, "nhash": self._nhash}

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add uint8 digests under new ids (see :meth:`SignalIndex.add`)."""
        new_ids = check_ids(ids)
        matrix = check_matrix(vectors, dtype=np.uint8, dim=PDQ_DIGEST_BYTES, what="digests")
        if new_ids.size != matrix.shape[0]:
            raise ValueError(f"{new_ids.size} ids for {matrix.shape[0]} digests")
        check_no_duplicates(self._ids, new_ids)
        if new_ids.size == 0:
            return
        if self._algorithm == "flat":
            self._index.add_with_ids(matrix, new_ids)
        else:
            self._mih.add(matrix)
            self._labels = np.concatenate([self._labels, new_ids])
        self._ids = merge_sorted(self._ids, new_ids)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id: deleted from a flat index, marked dead in a ``mih`` one."""
        present = np.intersect1d(self._ids, ids_from_iterable(ids), assume_unique=True)
        if present.size == 0:
            return 0
        if self._algorithm == "flat":
            removed = self._index.remove_ids(faiss.IDSelectorBatch(present))
            if removed != present.size:
                raise RuntimeError(f"FAISS removed {removed} of {present.size} entries")
        else:
            self._labels[np.isin(self._labels, present)] = _DEAD
            self._dead += int(present.size)
            if self._dead > MIH_COMPACT_FRACTION * self._labels.size:
                self._compact()
        self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        return int(present.size)

    def _compact(self) -> None:
        """Rebuild the hash tables from the live digests, in stored order."""
        live = self._labels != _DEAD
        storage: Any = faiss.downcast_IndexBinary(self._mih.storage)
        codes = faiss.vector_to_array(storage.xb).reshape(-1, PDQ_DIGEST_BYTES)[live]
        logger.info("compacting a PDQ multi-hash index: %d live, %d dead", live.sum(), self._dead)
        mih: Any = faiss.IndexBinaryMultiHash(PDQ_BITS, self._nhash, PDQ_BITS // self._nhash)
        mih.add(np.ascontiguousarray(codes))
        with self._mih_lock:
            self._mih = mih
        self._labels = self._labels[live]
        self._dead = 0

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Hits with distance <= ``threshold`` (bits, 0-256), nearest first, at most ``k``.

        Uses a range search so that every entry within the threshold is considered and ties
        at the k-th distance are broken by id, deterministically; a k-nearest search would
        let FAISS pick arbitrarily among equally distant entries. ``mih`` returns exactly what
        ``flat`` would (see the module docstring).
        """
        matrix = check_matrix(queries, dtype=np.uint8, dim=PDQ_DIGEST_BYTES, what="queries")
        k = check_k(k)
        ceiling = check_threshold(threshold, 0.0, float(PDQ_BITS), "Hamming")
        if len(self) == 0:
            return [[] for _ in range(matrix.shape[0])]
        # FAISS keeps distances strictly below the radius; distances are whole bits.
        farthest = math.floor(ceiling)
        radius = farthest + 1
        if self._algorithm == "flat":
            limits, distances, labels = self._index.range_search(matrix, radius)
        else:
            nflip = farthest // self._nhash
            if nflip <= MIH_MAX_NFLIP:
                with self._mih_lock:
                    self._mih.nflip = nflip
                    limits, distances, positions = self._mih.range_search(matrix, radius)
            else:
                limits, distances, positions = self._mih.storage.range_search(matrix, radius)
            labels = self._labels[positions]
        return [
            _row_hits(distances[lo:hi], labels[lo:hi], k)
            for lo, hi in zip(limits[:-1].tolist(), limits[1:].tolist(), strict=True)
        ]

    def _sections(self) -> dict[str, bytes]:
        if self._algorithm == "flat":
            return {"faiss": faiss.serialize_index_binary(self._index).tobytes()}
        # The hash tables themselves, not just the digests: FAISS reads them back about three
        # times faster than ``add`` rebuilds them (3.5 s against 9.4 s for 1M entries).
        return {
            "faiss": faiss.serialize_index_binary(self._mih).tobytes(),
            "labels": self._labels.astype("<i8").tobytes(),
        }

    @classmethod
    def _from_sections(
        cls,
        dim: int,
        count: int,
        params: Mapping[str, Any],
        sections: Mapping[str, Buffer],
    ) -> Self:
        header = dict(params)
        if header == _LEGACY_PARAMS:
            header = dict(_FLAT_PARAMS)
        if dim != PDQ_DIGEST_BYTES or header.pop("bits", None) != PDQ_BITS:
            raise ValueError(
                f"Hamming index must be {PDQ_DIGEST_BYTES} bytes / {PDQ_BITS} bits, "
                f"got dim {dim} and params {dict(params)}"
            )
        algorithm = header.pop("algorithm", None)
        # Per algorithm: its further header params, and its sections.
        layout = {"flat": (set(), {"faiss"}), "mih": ({"nhash"}, {"faiss", "labels"})}
        if not isinstance(algorithm, str) or algorithm not in layout:
            raise ValueError(f"unknown Hamming index algorithm {algorithm!r}")
        if set(header) != layout[algorithm][0]:
            raise ValueError(f"unknown or invalid Hamming index params {dict(params)}")
        expected = layout[algorithm][1]
        if set(sections) != expected:
            raise ValueError(f"{algorithm} Hamming index needs sections {sorted(expected)}")
        index = cls(algorithm="flat" if algorithm == "flat" else "mih", **header)
        loaded = _read_binary(sections["faiss"])
        if algorithm == "flat":
            index._load_flat(loaded, count)
        else:
            index._load_mih(loaded, sections["labels"], count)
        return index

    def _load_flat(self, loaded: Any, count: int) -> None:
        if not isinstance(loaded, faiss.IndexBinaryIDMap) or loaded.d != PDQ_BITS:
            raise ValueError(f"expected a 256-bit IndexBinaryIDMap, got {type(loaded).__name__}")
        if not isinstance(faiss.downcast_IndexBinary(loaded.index), faiss.IndexBinaryFlat):
            raise ValueError("expected an IndexBinaryFlat inside the id map")
        labels = faiss.vector_to_array(loaded.id_map).astype(np.int64)
        if labels.size != loaded.ntotal or np.unique(labels).size != labels.size:
            raise ValueError("the FAISS id map is inconsistent (wrong size or repeated ids)")
        if labels.size != count:
            raise ValueError(f"header says {count} entries, index holds {labels.size}")
        self._index = loaded
        self._ids = np.sort(labels)

    def _load_mih(self, loaded: Any, labels_bytes: Buffer, count: int) -> None:
        wanted = f"a 256-bit IndexBinaryMultiHash with {self._nhash} hash tables"
        if type(loaded) is not faiss.IndexBinaryMultiHash:
            raise ValueError(f"expected {wanted}, got {type(loaded).__name__}")
        mih: Any = loaded
        if mih.d != PDQ_BITS or mih.nhash != self._nhash or mih.b != PDQ_BITS // self._nhash:
            raise ValueError(f"expected {wanted}, got d={mih.d} nhash={mih.nhash} b={mih.b}")
        storage = faiss.downcast_IndexBinary(mih.storage)
        if not isinstance(storage, faiss.IndexBinaryFlat) or storage.ntotal != loaded.ntotal:
            raise ValueError("expected the multi-hash index to store its digests flat")
        if len(labels_bytes) != 8 * loaded.ntotal:
            raise ValueError(f"labels section holds {len(labels_bytes)} bytes, not 8 per entry")
        labels = np.frombuffer(labels_bytes, dtype="<i8").astype(np.int64)
        live = np.sort(labels[labels != _DEAD])
        if labels.size and int(labels.min()) < _DEAD:
            raise ValueError("labels must be entry ids or -1 (removed)")
        if np.unique(live).size != live.size:
            raise ValueError("labels repeat an entry id")
        if live.size != count:
            raise ValueError(f"header says {count} entries, index holds {live.size}")
        self._mih = loaded
        self._labels = labels
        self._dead = int(labels.size - live.size)
        self._ids = live


def _row_hits(distances: npt.NDArray[np.int32], labels: IdArray, k: int) -> list[Hit]:
    """One query's range-search results, without removed (-1) labels, ordered by distance
    then id and cut to ``k``."""
    keep = labels != _DEAD
    row_d = distances[keep].astype(np.int64)
    row_i = labels[keep]
    order = np.lexsort((row_i, row_d))[:k]
    return [Hit(int(row_i[j]), float(row_d[j])) for j in order]


def _read_binary(blob: Buffer) -> Any:
    """A FAISS binary index from verified section bytes; ValueError if FAISS cannot read it."""
    try:
        return faiss.deserialize_index_binary(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as exc:
        raise ValueError(f"FAISS could not read the index: {exc}") from exc
