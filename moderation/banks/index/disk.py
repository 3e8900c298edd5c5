"""The ``ivf_disk`` cosine index (:class:`~moderation.banks.index.cosine.CosineIndex`):
candidates from an in-RAM inverted file over projected vectors, re-ranked by exact cosine over
full-width float16 rows kept in an encrypted row file (:mod:`moderation.banks.rowfile`) and
read per query.

The candidate stage is ``ivf_pca``'s (``PCA<256>,IVF<nlist>,SQ8``, see
:mod:`.cosine_projection`) without its in-RAM re-ranking codes: about 270 bytes per entry in RAM
(256 8-bit codes, an 8-byte position in its inverted list, an 8-byte id label) instead of 2.8 KB,
so 10M entries fit a worker of a few GB. Each query reads the rows (2.5 KB each at 1280-d) of
the ``k x RERANK_FACTOR`` of its ``k x k_factor`` SQ8 candidates with the highest estimated
cosine (:data:`RESIDUAL_WEIGHT`) with ``os.pread`` and decrypts only those; scores are the
full-width cosines of the float16 rows (error about 1e-4), as with ``ivf_pca``, so policy
thresholds keep their meaning. Jégou, Douze and Schmid, "Product quantization for nearest
neighbor search", TPAMI 2011, section 4 (IVF with re-ranking); the FAISS wiki "Indexes that do
not fit in RAM" keeps inverted lists on disk instead, which here would read whole lists
(thousands of codes) per probe rather than 80 rows.

FAISS ids inside the candidate index are row positions in the row file; ``labels`` maps a
position to its entry id (-1: removed). Removal deletes the position from the inverted lists;
its row stays in the file (unreachable) until the next snapshot version rebuilds the index.

A loaded index's row file is read-only (it belongs to a snapshot version). Entries added to it
afterwards (a delta version applied in place, :func:`moderation.banks.blocklist.catch_up`) join
the same inverted lists with the trained projection and quantiser, and their float16 rows are
kept in RAM (:attr:`DiskIvf.extra`): positions from ``len(row file)`` on are rows of ``extra``.
Searches score both kinds of rows alike (exact cosine of the float16 row), so the result is
the one an index holding every row in its file gives for the same inverted lists. A delta
chain is bounded (``MAX_CHAIN_DELTAS``, compaction), and so is ``extra``: 2.5 KB per added
entry at 1280-d.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Final, Self

import faiss
import numpy as np
import numpy.typing as npt

from moderation.banks.index.base import Buffer, IdArray
from moderation.banks.index.cosine_projection import (
    IVF_TRAIN_ROWS_PER_LIST,
    PCA_TRAIN_ROWS,
    PCA_TRAIN_SEED,
    learn_projection,
)
from moderation.banks.index.loading import check_ivf, read_faiss
from moderation.banks.rowfile import RowFile, RowFileDescriptor, RowFileError

#: Suffix of the row files an ``ivf_disk`` index creates in its row directory.
ROWS_SUFFIX: Final = ".rows"

#: Degree and search breadth of the HNSW graph over the inverted lists' centroids (FAISS
#: wiki "Guidelines to choose an index": ``IVF<n>_HNSW32`` for large ``nlist``).
QUANTISER_HNSW_M: Final = 32
QUANTISER_EF_SEARCH: Final = 128

#: k-means iterations for the lists' centroids (FAISS's default is 25; the lists only
#: partition the candidates, and 10 keeps training at 10M entries to minutes on 2 cores).
KMEANS_ITERATIONS: Final = 10

#: Rows read and re-ranked per query: the ``k x RERANK_FACTOR`` of the ``k x k_factor`` SQ8
#: candidates with the highest estimated cosine (80 of 320 at k = 10). Measured on 1M entries
#: (``scripts/bench_index_memory.py``, 200 queries): recall@10 0.996 from 60 rows up, as with
#: all 320; by the SQ8 score alone 80 rows give 0.964 and 160 give 0.995. Fewer rows per query
#: is what bounds a query on a cold page cache: it waits for its slowest read.
RERANK_FACTOR: Final = 8

#: Weight of ``|q_r| |x_r|`` in a candidate's estimated cosine ``<Pq, Px~> + w |q_r| |x_r|``
#: (``Px~`` the decoded SQ8 projection, ``q_r``, ``x_r`` the parts of the unit vectors outside
#: the projection: ``|x_r| = sqrt(1 - |Px~|^2)``). The cosine is ``<Pq, Px> + <q_r, x_r>``,
#: and ``<q_r, x_r> <= |q_r| |x_r|`` (Cauchy-Schwarz), near that bound for a near-duplicate
#: (its residual points the query's way). The SQ8 score alone ranks entries with much energy
#: outside the 256 dimensions too low (the score is 0.04 under the cosine at the median, 0.12
#: at the 99th percentile). Chosen at 1M: 0.75 reaches recall@10 0.996 from 60 rows; 0.5 from
#: 80; 1.0 (the bound itself) from 80.
RESIDUAL_WEIGHT: Final = 0.75

#: Most rows the k-means sees: 32 per list at 8192 lists (FAISS warns below 39, which costs
#: nothing here: a coarser partition only moves candidates between probed lists).
DISK_TRAIN_ROWS: Final = 262_144


class DiskIvf:
    """Candidate index, position labels and row file of one ``ivf_disk`` index."""

    def __init__(self, dim: int, pca_dim: int, nlist: int, nprobe: int, k_factor: int) -> None:
        """An empty, untrained index; rows go to a file created by :meth:`attach_new_rows`."""
        projection = faiss.LinearTransform(dim, pca_dim, False)
        # An HNSW graph over the centroids assigns rows to lists (FAISS "IVF<n>_HNSW32"): at
        # 10M rows and 8192 lists an exact assignment is 4e13 flops, half an hour here.
        quantiser = faiss.IndexHNSWFlat(pca_dim, QUANTISER_HNSW_M, faiss.METRIC_INNER_PRODUCT)
        quantiser.hnsw.efSearch = max(QUANTISER_EF_SEARCH, 2 * nprobe)
        ivf = faiss.IndexIVFScalarQuantizer(
            quantiser, pca_dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        # k-means on an exact index, then the graph is built (a C char the stubs call str).
        ivf.quantizer_trains_alone = 2  # type: ignore[assignment]
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.nprobe = nprobe
        self._quantiser = quantiser  # the SWIG wrapper does not own it
        self.index: Any = faiss.IndexPreTransform(projection, ivf)
        self.dim, self.pca_dim, self.nlist, self.k_factor = dim, pca_dim, nlist, k_factor
        self.labels: IdArray = np.empty(0, dtype=np.int64)
        self.rows: RowFile | None = None
        self.descriptor: RowFileDescriptor | None = None  # loaded, not yet opened
        self.backing: npt.NDArray[np.uint8] | None = None
        #: Rows added after loading (read-only row file), float16 ``(m, dim)``, in RAM.
        self.extra: npt.NDArray[np.float16] = np.zeros((0, dim), np.float16)
        self._order: IdArray | None = None
        #: Search-time settings (not serialized): see RERANK_FACTOR and RESIDUAL_WEIGHT.
        self.rerank_factor, self.residual_weight = RERANK_FACTOR, RESIDUAL_WEIGHT

    def attach_new_rows(self, row_dir: Path, name: str | None = None) -> None:
        """Create this index's (empty) row file in ``row_dir``: ``name``, or
        ``rows-<uuid>.rows``. Raises RowFileError."""
        row_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = row_dir / (name or f"rows-{uuid.uuid4().hex}{ROWS_SUFFIX}")
        self.rows = RowFile.create(path, self.dim)

    def open_rows(self, row_dir: Path) -> None:
        """Open the row file a loaded index names, read-only, in ``row_dir``."""
        if self.descriptor is not None:
            self.rows = RowFile.open(row_dir, self.descriptor, self.dim)

    def _file(self) -> RowFile:
        if self.rows is None:
            raise RowFileError(
                "this ivf_disk index has no open row file: build it with row_dir=..., or load "
                "it with load_index(..., row_dir=the snapshot directory)"
            )
        return self.rows

    def train(self, matrix: npt.NDArray[np.float32]) -> None:
        """Learn the projection and the inverted lists from float32 ``(n, dim)`` unit vectors
        (a seeded sample of up to :data:`DISK_TRAIN_ROWS` rows). Raises ValueError
        with fewer rows than lists."""
        if len(matrix) < self.nlist:
            raise ValueError(
                f"ivf_disk needs at least nlist={self.nlist} vectors in its first add, "
                f"got {len(matrix)}"
            )
        projection: Any = faiss.downcast_VectorTransform(self.index.chain.at(0))
        faiss.copy_array_to_vector(learn_projection(matrix, self.pca_dim).ravel(), projection.A)
        projection.is_trained = True
        rows = max(PCA_TRAIN_ROWS, min(IVF_TRAIN_ROWS_PER_LIST * self.nlist, DISK_TRAIN_ROWS))
        sample = matrix
        if len(matrix) > rows:
            rng = np.random.default_rng(PCA_TRAIN_SEED)
            sample = matrix[np.sort(rng.choice(len(matrix), rows, replace=False))]
        self.index.index.train(projection.apply(np.ascontiguousarray(sample)))
        self.index.is_trained = True

    def add(self, ids: IdArray, matrix: npt.NDArray[np.float32]) -> None:
        """Append rows and index them (ids already checked by the caller): to the row file
        this process is writing, else (a loaded index) to :attr:`extra` in RAM."""
        rows = self._file()
        if not self.index.is_trained:
            self.train(matrix)
        start = self.labels.size
        if rows.writable and not self.extra.size:
            rows.append(matrix)
        else:
            self.extra = np.concatenate([self.extra, matrix.astype(np.float16)])
        self.own()
        self.index.add_with_ids(matrix, np.arange(start, start + len(ids), dtype=np.int64))
        self.labels = np.concatenate([self.labels, ids])
        self._order = None

    def remove(self, ids: IdArray) -> None:
        """Drop live ``ids`` (all present) from the inverted lists."""
        positions = self._positions(ids)
        self.index.index.remove_ids(faiss.IDSelectorBatch(positions))
        self.index.ntotal = self.index.index.ntotal  # IndexPreTransform does not follow
        self.labels[positions] = -1
        self._order = None

    def _positions(self, ids: IdArray) -> IdArray:
        """Row positions of live ``ids`` (KeyError naming the first one not live)."""
        if self._order is None:
            self._order = np.argsort(self.labels, kind="stable")
        order = self._order
        found = np.minimum(np.searchsorted(self.labels, ids, sorter=order), order.size - 1)
        positions = order[found] if order.size else np.zeros(len(ids), np.int64)
        missing = (self.labels[positions] != ids) if order.size else np.ones(len(ids), bool)
        if missing.any():
            raise KeyError(f"not in the index: {int(ids[np.flatnonzero(missing)[0]])}")
        return positions.astype(np.int64)

    def reconstruct(self, ids: IdArray) -> npt.NDArray[np.float32]:
        """The float16 rows of live ``ids``, widened to float32 ``(len(ids), dim)``."""
        positions = self._positions(ids)
        order = np.argsort(positions, kind="stable")
        out = np.empty((len(positions), self.dim), np.float32)
        out[order] = self.read_rows(positions[order])
        return out

    def read_rows(self, positions: IdArray) -> npt.NDArray[np.float32]:
        """Rows at ascending ``positions``, float32 ``(len(positions), dim)``: from the row
        file, and from :attr:`extra` past its end. Raises RowFileError as ``RowFile.read``."""
        rows = self._file()
        stored = len(rows)
        split = int(np.searchsorted(positions, stored))
        found = rows.read(positions[:split])
        if split == len(positions):
            return found
        added = self.extra[positions[split:] - stored].astype(np.float32)
        return np.concatenate([found, added])

    def candidates(
        self, queries: npt.NDArray[np.float32], count: int, nprobe: int
    ) -> tuple[npt.NDArray[np.float32], IdArray]:
        """The ``count`` best SQ8 candidates of float32 unit ``(q, dim)`` queries: estimated
        cosines (float32, see :data:`RESIDUAL_WEIGHT`; -inf past the candidates found) and
        row positions (int64, -1 there), both ``(q, count)``, in the SQ8 score's order."""
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        projection: Any = faiss.downcast_VectorTransform(self.index.chain.at(0))
        projected = projection.apply(np.ascontiguousarray(queries, dtype=np.float32))
        # The decoded codes give each candidate's |Px~| (FAISS decodes them from the list
        # offsets the scan found: no id -> code map in RAM).
        approx, positions, decoded = self.index.index.search_and_reconstruct(
            projected, count, params=params
        )
        query_out = np.sqrt(np.maximum(0.0, 1.0 - np.einsum("ij,ij->i", projected, projected)))
        entry_out = np.sqrt(np.maximum(0.0, 1.0 - np.einsum("ijk,ijk->ij", decoded, decoded)))
        estimate = approx + self.residual_weight * query_out[:, None] * entry_out
        return np.where(positions >= 0, estimate, -np.inf).astype(np.float32), positions

    def search(
        self, queries: npt.NDArray[np.float32], k: int, nprobe: int
    ) -> tuple[npt.NDArray[np.float32], IdArray]:
        """Top-``k`` exact cosines and entry ids per query, float32 and int64 ``(q, k)``
        (-1 ids past the candidates found): of the ``k x k_factor`` SQ8 candidates, the rows
        of the ``k x rerank_factor`` best estimated ones are read and scored exactly."""
        estimate, candidates = self.candidates(queries, k * self.k_factor, nprobe)
        depth = k * max(1, min(self.rerank_factor, self.k_factor))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        for q, (query, found, guess) in enumerate(zip(queries, candidates, estimate, strict=True)):
            if found.size > depth:
                found = found[np.argpartition(-guess, depth - 1)[:depth]]
            positions = np.sort(found[found >= 0])  # ascending: forward reads
            exact = self.read_rows(positions) @ query
            top = np.argsort(-exact, kind="stable")[:k]
            scores[q, : top.size] = exact[top]
            labels[q, : top.size] = self.labels[positions[top]]
        return scores, labels

    def emptied_index(self) -> Any:
        """A copy of the candidate index with this one's trained projection, lists'
        centroids and SQ8 ranges and no entries: what compaction streams rows into without
        retraining (:mod:`moderation.banks.disk_compaction`). Copies the index once (its codes
        included, then dropped: transiently its size in RAM)."""
        copy = faiss.deserialize_index(faiss.serialize_index(self.index))
        copy.reset()
        return copy

    def own(self) -> None:
        """Give a zero-copy loaded candidate index owned arrays before a change."""
        if self.backing is not None:
            self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
            self.backing = None

    def sections(self) -> dict[str, bytes]:
        """``faiss`` (candidate index), ``labels`` (int64 little-endian, position -> id, -1
        removed) and ``rows`` (the row file's descriptor: name, id, key, rows; fsynced
        first). Raises RowFileError without a row file, or with rows in :attr:`extra` (a
        snapshot version writes its own row file: :mod:`moderation.banks.disk_compaction`)."""
        if self.extra.size:
            raise RowFileError(
                f"this ivf_disk index holds {len(self.extra)} rows added after loading in "
                "RAM only: write a new version (compaction) instead of serializing it"
            )
        if self.rows is None and self.descriptor is not None:
            descriptor = self.descriptor
        else:
            rows = self._file()
            if rows.descriptor().rows:
                rows.sync()
            descriptor = rows.descriptor()
        return {
            "faiss": faiss.serialize_index(self.index).tobytes(),
            "labels": self.labels.astype("<i8").tobytes(),
            "rows": descriptor.to_bytes(),
        }

    @classmethod
    def from_sections(
        cls, dim: int, params: dict[str, Any], sections: dict[str, Buffer], count: int
    ) -> Self:
        """Rebuild from :meth:`sections` (row file not opened yet). Raises ValueError."""
        disk = cls(dim, params["pca_dim"], params["nlist"], params["nprobe"], params["k_factor"])
        loaded, disk.backing = read_faiss(sections["faiss"], dim, wrapper=faiss.IndexPreTransform)
        chain: Any = loaded
        if chain.chain.size() != 1:
            raise ValueError("expected one projection before the inverted file")
        ivf = faiss.downcast_index(chain.index)
        check_ivf(ivf, params["nlist"], params["nprobe"])
        if len(sections["labels"]) % 8:
            raise ValueError("labels section is not a whole number of int64")
        labels = np.frombuffer(sections["labels"], dtype="<i8").astype(np.int64)
        descriptor = RowFileDescriptor.from_bytes(sections["rows"])
        live = np.sort(labels[labels >= 0])
        if descriptor.rows != labels.size or live.size != count or ivf.ntotal != count:
            raise ValueError("ivf_disk labels, row file and candidate index disagree in size")
        if live.size > 1 and np.any(live[1:] == live[:-1]):
            raise ValueError("ivf_disk labels repeat an id")
        disk.index, disk.labels, disk.descriptor = loaded, labels, descriptor
        return disk
