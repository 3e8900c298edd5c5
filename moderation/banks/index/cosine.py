"""Cosine-similarity index over L2-normalised float32 embeddings (FAISS inner product).

Exact ``IndexFlatIP`` for small banks, HNSW over inner product (Malkov & Yashunin, "Efficient
and robust approximate nearest neighbor search using Hierarchical Navigable Small World
graphs", TPAMI 2018) for large ones, both inside ``IndexIDMap`` so FAISS returns entry ids.
The choice follows the FAISS wiki "Guidelines to choose an index": Flat when exact results are
needed, ``HNSWx`` when memory is not the constraint, and for the largest banks
``PCA<p>,HNSW<M>,Refine(SQfp16)``: candidates from an HNSW graph over vectors projected to ``p``
dimensions (a projection learned from the bank when the index is built), re-ranked by cosine
over the full-width vectors stored as float16 codes (FAISS ``IndexRefine``; Jégou, Douze and
Schmid, "Product quantization for nearest neighbor search", TPAMI 2011, section on re-ranking).
Scores stay full-width cosines (float16: error about 1e-4), so policy thresholds keep their
meaning, at about 3.3 KB per entry instead of 5.4 KB. 8-bit codes (2.1 KB per entry) were
measured first and dropped: their ranking error (about 2e-3) swaps near-tied neighbours, recall@10
against exact search 0.985 instead of 0.994 at 100k generated entries (``moderation benchmark
speed``'s vectors, efSearch 256, 32 candidates per result).

For banks from :data:`PCA_MIN_ENTRIES` entries ``build`` chooses ``PCA<256>,IVF<nlist>,SQ8,
Refine(SQfp16)`` (``ivf_pca``): the same projection and re-ranking, with candidates from an
inverted file (Jégou, Douze and Schmid, TPAMI 2011, section 4: k-means lists over the
projections, :data:`IVF_NPROBE` lists scanned with 8-bit codes) instead of an HNSW graph. At 1M
generated entries the graph's candidates missed true neighbours in these dense clusters of
near-duplicates (recall@10 0.82 with 128-d, 0.97 with 256-d projections and 2560 candidates at
p99 9 ms), while the inverted file reached 0.9965 at p99 0.65 ms, built in a third of the time
and at 2.8 instead of 3.4 KB per entry. ``hnsw_pca`` stays readable and can be asked for.

Loading is zero-copy: a deserialized index's FAISS arrays (codes, graph) are views into the
caller's buffer (FAISS ``ZeroCopyIOReader`` with ``IO_FLAG_MMAP_IFC``), which the index keeps
alive; the first change (add, remove) makes an owned copy, because FAISS aborts the process on
a resize of a viewed array.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Self, TypeVar

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

logger = logging.getLogger(__name__)

#: Bank size (entries) from which ``build(algorithm="auto")`` uses HNSW instead of an exact
#: scan. Below it the scan is cheap and exact: FAISS ``IndexFlatIP`` is memory-bound at about
#: 53 ms per query for 100k x 1280-d on the 2-core development machine (BENCHMARKS.md), so
#: about 27 ms at 50k, and 22 ms was measured for 100k x 512-d. Above it the scan grows linearly
#: with the bank while HNSW stays near 1-2 ms per query (1.8 ms measured at 100k x 512-d).
HNSW_MIN_ENTRIES: Final = 50_000

#: HNSW graph degree. 32 is the FAISS wiki's usual choice ("HNSW32"; M from 4 to 64 trades
#: memory, 2*M*4 bytes of links per entry at level 0, for recall).
HNSW_M: Final = 32

#: HNSW candidate-list size while building. FAISS defaults to 40; 100 gave recall@10 of 0.99
#: (efSearch 128) on 20k random 64-d unit vectors, a harder case than real embeddings, while
#: building in half the time of 200 (measured: 5 s versus 10 s on 2 loaded cores).
HNSW_EF_CONSTRUCTION: Final = 100

#: HNSW candidate-list size while searching (raised to ``k`` when ``k`` is larger). 128 gave
#: recall@10 >= 0.98 in the measurement above, where FAISS's default of 16 gives far less; the
#: cost stays about 1-2 ms per query.
HNSW_EF_SEARCH: Final = 128

#: Largest tolerated deviation of a vector's L2 norm from 1. The encoder normalises in float32
#: (norm error about 1e-7 * sqrt(dim)); 1e-3 also admits vectors stored as float16 and widened,
#: while an unnormalised embedding (norm typically 5-50) is refused instead of giving wrong
#: cosines.
UNIT_NORM_TOLERANCE: Final = 1e-3

#: HNSW cannot delete. Removed ids become tombstones, skipped during search through a FAISS
#: ``IDSelector``; once they exceed this fraction of the graph the graph is rebuilt from its
#: stored vectors without them. Dead nodes still cost traversal time and dilute the candidate
#: list, so letting them pile up degrades speed and recall; rebuilding costs a full HNSW build,
#: amortised over at least this fraction of the bank in removals.
TOMBSTONE_COMPACT_FRACTION: Final = 0.2

#: Bank size from which ``build(algorithm="auto")`` uses ``ivf_pca`` for vectors wider than
#: :data:`IVF_PCA_DIM`: the same size as HNSW, because at 100k x 1280-d the projected indexes
#: measured better on every count than ``hnsw`` (recall@10 0.99 vs 0.97 with efSearch 128,
#: fewer bytes per entry, a fraction of the snapshot load time); plain ``hnsw`` remains for
#: narrow vectors.
PCA_MIN_ENTRIES: Final = HNSW_MIN_ENTRIES

#: Width of the projected vectors the ``hnsw_pca`` graph is built on. 128 of the 1280
#: EfficientNet-Lite0 dimensions keep about 78% of the embeddings' energy; the refine stage
#: restores full-width cosines, so the projection only has to bring the true neighbours into
#: the candidate list (measured: recall@10 0.99 at 100k with :data:`REFINE_K_FACTOR` 32 and
#: efSearch 512; ``moderation benchmark speed`` reports it at 100k and 1M).
PCA_DIM: Final = 128

#: Width of the projected vectors ``ivf_pca`` clusters and scans. At 1M generated entries
#: (``moderation benchmark speed``'s vectors) an exact search over 256-d projections already
#: holds every true top-10 neighbour in its first 320 results, 128-d projections only 92%.
IVF_PCA_DIM: Final = 256

#: Inverted lists probed per query. Measured at 1M entries with 2048 lists: recall@10 0.9955
#: with 16, 0.9965 with 32 to 128 (the rest is float16 ranking ties), p50 0.52 ms with 32.
IVF_NPROBE: Final = 32

#: Training rows per inverted list for the k-means of ``ivf_pca`` (FAISS warns below 39).
IVF_TRAIN_ROWS_PER_LIST: Final = 64

#: Rows sampled (seeded) to learn the projection (and an 8-bit quantiser's ranges, for indexes
#: built before float16 codes).
PCA_TRAIN_ROWS: Final = 50_000
PCA_TRAIN_SEED: Final = 20240607

#: Candidates per wanted result that the refine stage re-ranks (k x 32 for ``hnsw_pca``).
REFINE_K_FACTOR: Final = 32

#: HNSW candidate-list size of ``hnsw_pca`` searches (raised to ``k * k_factor``).
PCA_EF_SEARCH: Final = 512

Algorithm = Literal["flat", "hnsw", "hnsw_pca", "ivf_pca"]
_AnyIndex = TypeVar("_AnyIndex", faiss.Index, faiss.IndexBinary)
_PARAM_KEYS: Final = {
    "flat": {"algorithm"},
    "hnsw": {"algorithm", "hnsw_m", "ef_construction", "ef_search"},
    "hnsw_pca": {"algorithm", "hnsw_m", "ef_construction", "ef_search", "pca_dim", "k_factor"},
    "ivf_pca": {"algorithm", "nlist", "nprobe", "pca_dim", "k_factor"},
}
_PROJECTED: Final = ("hnsw_pca", "ivf_pca")


def ivf_nlist(entries: int) -> int:
    """Inverted lists for ``ivf_pca`` over ``entries`` vectors: the power of two nearest
    ``2 * sqrt(entries)``, within [64, 65536] (the FAISS wiki "Guidelines to choose an index"
    suggests 4 to 16 x sqrt(n) for its IVF scans; fewer, larger lists here because
    :data:`IVF_NPROBE` lists are scanned with 8-bit codes and re-ranked: 2048 at 1M entries)."""
    target = 2.0 * max(entries, 1) ** 0.5
    return int(min(65536, max(64, 2 ** round(np.log2(target)))))


def learn_projection(
    vectors: npt.NDArray[np.float32], out_dim: int, *, seed: int = PCA_TRAIN_SEED
) -> npt.NDArray[np.float32]:
    """The ``out_dim`` x d float32 projection onto the top eigenvectors of the (uncentred)
    second-moment matrix of up to :data:`PCA_TRAIN_ROWS` rows sampled from ``vectors`` (n, d).

    Uncentred, unlike textbook PCA: for unit vectors the inner product of projections then
    approximates the cosine (it is the cosine minus the energy of the dropped directions), which
    is what an inner-product graph over the projections should rank by.
    """
    rng = np.random.default_rng(seed)
    rows = vectors
    if len(vectors) > PCA_TRAIN_ROWS:
        rows = vectors[np.sort(rng.choice(len(vectors), PCA_TRAIN_ROWS, replace=False))]
    moment = rows.astype(np.float64).T @ rows.astype(np.float64)
    _, eigenvectors = np.linalg.eigh(moment)  # ascending eigenvalues
    top = eigenvectors[:, ::-1][:, :out_dim].T
    return np.ascontiguousarray(top, dtype=np.float32)


def _renormalise_decoded(decoded: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Stored vectors read back from FAISS, float32 (n, d): float32 rows and float16 codes come
    back within :data:`UNIT_NORM_TOLERANCE` / 2 of unit norm and are returned as they are (so
    re-adding them is lossless); 8-bit codes of older indexes are renormalised."""
    vectors = np.asarray(decoded, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE / 2):
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def _check_unit_norm(vectors: npt.NDArray[np.float32], what: str) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{what} must be L2-normalised (|norm - 1| <= {UNIT_NORM_TOLERANCE}); "
            f"row {row} has norm {float(norms[row]):.6g} ({bad.size} row(s) in all)"
        )


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class CosineIndex(SignalIndex):
    """Cosine similarity over float32 ``(n, dim)`` unit vectors; ``Hit.score`` is the cosine."""

    kind = "cosine"

    def __init__(
        self,
        dim: int,
        *,
        algorithm: Algorithm = "flat",
        hnsw_m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        pca_dim: int | None = None,
        k_factor: int = REFINE_K_FACTOR,
        nlist: int = 1024,
        nprobe: int = IVF_NPROBE,
    ) -> None:
        """An empty index of ``dim``-wide vectors; see :meth:`build` for the parameters."""
        if algorithm not in _PARAM_KEYS:
            raise ValueError(f"algorithm must be one of {sorted(_PARAM_KEYS)}, got {algorithm!r}")
        if pca_dim is None:
            pca_dim = IVF_PCA_DIM if algorithm == "ivf_pca" else PCA_DIM
        self._dim = _positive_int(dim, "dim")
        self._algorithm: Algorithm = algorithm
        self._hnsw_m = _positive_int(hnsw_m, "hnsw_m")
        self._ef_construction = _positive_int(ef_construction, "ef_construction")
        self._ef_search = _positive_int(ef_search, "ef_search")
        self._pca_dim = _positive_int(pca_dim, "pca_dim")
        self._k_factor = _positive_int(k_factor, "k_factor")
        self._nlist = _positive_int(nlist, "nlist")
        self._nprobe = _positive_int(nprobe, "nprobe")
        if algorithm in _PROJECTED and self._pca_dim >= self._dim:
            raise ValueError(f"pca_dim ({self._pca_dim}) must be below dim ({self._dim})")
        self._index = self._new_faiss_index()
        self._search_index: faiss.Index = self._index
        self._ids: IdArray = np.empty(0, dtype=np.int64)
        self._tombstones: IdArray = np.empty(0, dtype=np.int64)
        self._selector: tuple[faiss.IDSelectorBatch, faiss.IDSelectorNot] | None = None
        # The buffer a zero-copy load's FAISS arrays point into (see the module docstring).
        self._backing: npt.NDArray[np.uint8] | None = None
        self._labels: tuple[IdArray, IdArray] | None = None

    @classmethod
    def build(
        cls,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        algorithm: Algorithm | Literal["auto"] = "auto",
        hnsw_m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int | None = None,
        pca_dim: int | None = None,
        k_factor: int = REFINE_K_FACTOR,
        nlist: int | None = None,
        nprobe: int = IVF_NPROBE,
        **params: Any,
    ) -> Self:
        """Build from ``(n,)`` int ids and ``(n, dim)`` float32 unit vectors.

        Args:
            algorithm: ``"flat"`` (exact), ``"hnsw"`` (approximate), ``"hnsw_pca"`` (projected
                HNSW candidates re-ranked by full-width cosine), ``"ivf_pca"`` (projected
                inverted-file candidates, re-ranked the same way) or ``"auto"``: ``ivf_pca``
                when ``n >= PCA_MIN_ENTRIES`` and ``dim > IVF_PCA_DIM``, else HNSW when
                ``n >= HNSW_MIN_ENTRIES``, else flat. The choice is fixed for the index's life;
                entries added later do not switch it (rebuild to re-decide).
            hnsw_m, ef_construction, ef_search: HNSW parameters, recorded in the header
                (``ef_search`` defaults to :data:`HNSW_EF_SEARCH`, or :data:`PCA_EF_SEARCH`
                for ``hnsw_pca``).
            pca_dim, k_factor: ``hnsw_pca`` and ``ivf_pca``: projected width (learned from
                these vectors, :func:`learn_projection`; default :data:`PCA_DIM`, or
                :data:`IVF_PCA_DIM` for ``ivf_pca``) and re-ranked candidates per result.
            nlist, nprobe: ``ivf_pca``: inverted lists (default :func:`ivf_nlist` of these
                vectors' count: fixed for the index's life, so build from the whole bank) and
                lists scanned per query.

        Raises:
            ValueError: malformed input (see :class:`SignalIndex`), vectors not unit-norm, or
                an unknown parameter.
        """
        if params:
            raise ValueError(f"unknown CosineIndex parameter(s): {sorted(params)}")
        matrix = check_matrix(vectors, dtype=np.float32, dim=None, what="vectors")
        n = len(matrix)
        chosen: Algorithm
        if algorithm == "auto":
            n, dim = matrix.shape
            if n >= PCA_MIN_ENTRIES and dim > (pca_dim or IVF_PCA_DIM):
                chosen = "ivf_pca"
            else:
                chosen = "hnsw" if n >= HNSW_MIN_ENTRIES else "flat"
        else:
            chosen = algorithm
        if ef_search is None:
            ef_search = PCA_EF_SEARCH if chosen == "hnsw_pca" else HNSW_EF_SEARCH
        index = cls(
            matrix.shape[1],
            algorithm=chosen,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            pca_dim=pca_dim,
            k_factor=k_factor,
            # At least 39 training rows per list (FAISS's k-means warns below that).
            nlist=nlist if nlist is not None else min(ivf_nlist(n), max(1, n // 39)),
            nprobe=nprobe,
        )
        index.add(ids, matrix)
        return index

    def _new_faiss_index(self) -> faiss.IndexIDMap:
        inner: faiss.Index
        if self._algorithm in _PROJECTED:
            projection = faiss.LinearTransform(self._dim, self._pca_dim, False)
            candidates: faiss.Index
            if self._algorithm == "ivf_pca":
                # Lists scanned with 8-bit codes: candidates only, re-ranked below.
                ivf = faiss.IndexIVFScalarQuantizer(
                    faiss.IndexFlatIP(self._pca_dim),
                    self._pca_dim,
                    self._nlist,
                    faiss.ScalarQuantizer.QT_8bit,
                    faiss.METRIC_INNER_PRODUCT,
                )
                ivf.nprobe = self._nprobe
                candidates = ivf
            else:
                graph = faiss.IndexHNSWFlat(self._pca_dim, self._hnsw_m, faiss.METRIC_INNER_PRODUCT)
                graph.hnsw.efConstruction = self._ef_construction
                graph.hnsw.efSearch = self._ef_search
                candidates = graph
            codes = faiss.IndexScalarQuantizer(
                self._dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            refine = faiss.IndexRefine(faiss.IndexPreTransform(projection, candidates), codes)
            refine.k_factor = float(self._k_factor)
            # faiss's Python constructors keep references to the parts they are given.
            return faiss.IndexIDMap(refine)
        if self._algorithm == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self._dim, self._hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self._ef_construction
            hnsw.hnsw.efSearch = self._ef_search
            inner = hnsw
        else:
            inner = faiss.IndexFlatIP(self._dim)
        return faiss.IndexIDMap(inner)

    @property
    def dim(self) -> int:
        """Vector width (floats)."""
        return self._dim

    @property
    def algorithm(self) -> Algorithm:
        """``"flat"`` (exact), ``"hnsw"``, ``"hnsw_pca"`` or ``"ivf_pca"`` (approximate)."""
        return self._algorithm

    @property
    def params(self) -> dict[str, ParamValue]:
        """``algorithm``, plus ``hnsw_m``, ``ef_construction``, ``ef_search`` for HNSW and
        also ``pca_dim``, ``k_factor`` for ``hnsw_pca``."""
        if self._algorithm == "flat":
            return {"algorithm": "flat"}
        if self._algorithm == "ivf_pca":
            return {
                "algorithm": "ivf_pca",
                "nlist": self._nlist,
                "nprobe": self._nprobe,
                "pca_dim": self._pca_dim,
                "k_factor": self._k_factor,
            }
        params: dict[str, ParamValue] = {
            "algorithm": self._algorithm,
            "hnsw_m": self._hnsw_m,
            "ef_construction": self._ef_construction,
            "ef_search": self._ef_search,
        }
        if self._algorithm == "hnsw_pca":
            params.update(pca_dim=self._pca_dim, k_factor=self._k_factor)
        return params

    @property
    def tombstones(self) -> int:
        """Removed entries still in the HNSW graph (always 0 for flat)."""
        return int(self._tombstones.size)

    def _vectors(self, vectors: npt.ArrayLike, what: str) -> npt.NDArray[np.float32]:
        matrix = check_matrix(vectors, dtype=np.float32, dim=self._dim, what=what)
        _check_unit_norm(matrix, what)
        return matrix

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add float32 unit vectors under new ids (see :meth:`SignalIndex.add`)."""
        new_ids = check_ids(ids)
        matrix = self._vectors(vectors, "vectors")
        if new_ids.size != matrix.shape[0]:
            raise ValueError(f"{new_ids.size} ids for {matrix.shape[0]} vectors")
        check_no_duplicates(self._ids, new_ids)
        if new_ids.size == 0:
            return
        self._own()
        if self._tombstones.size and np.isin(new_ids, self._tombstones).any():
            # A re-added id would otherwise match both its tombstoned and its new vector.
            self._compact()
        if not self._index.is_trained:
            self._train(self._index, matrix)
        self._index.add_with_ids(matrix, new_ids)
        self._labels = None
        self._ids = merge_sorted(self._ids, new_ids)
        self._drop_gpu_copy()

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries; flat deletes them, HNSW tombstones them (see the module constants)."""
        present = np.intersect1d(self._ids, ids_from_iterable(ids), assume_unique=True)
        if present.size == 0:
            return 0
        if self._algorithm == "flat":
            self._own()
            removed = self._index.remove_ids(faiss.IDSelectorBatch(present))
            self._labels = None
            if removed != present.size:
                raise RuntimeError(f"FAISS removed {removed} of {present.size} entries")
        else:
            self._tombstones = merge_sorted(self._tombstones, present)
            self._selector = None
        self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        if self._tombstones.size > TOMBSTONE_COMPACT_FRACTION * self._index.ntotal:
            self._compact()
        self._drop_gpu_copy()
        return int(present.size)

    def _train(self, index: faiss.IndexIDMap, matrix: npt.NDArray[np.float32]) -> None:
        """Learn a projected index's projection, its inverted lists' centroids and 8-bit
        ranges (``ivf_pca``, FAISS k-means) and the re-ranking quantiser from ``matrix``.

        Raises:
            ValueError: ``ivf_pca`` with fewer rows than inverted lists.
        """
        if self._algorithm == "ivf_pca" and len(matrix) < self._nlist:
            raise ValueError(
                f"ivf_pca needs at least nlist={self._nlist} vectors in its first add, "
                f"got {len(matrix)}"
            )
        # faiss's bundled stubs lack IndexRefine/IndexPreTransform members: typed as Any.
        refine: Any = faiss.downcast_index(index.index)
        base: Any = faiss.downcast_index(refine.base_index)
        projection: Any = faiss.downcast_VectorTransform(base.chain.at(0))
        faiss.copy_array_to_vector(learn_projection(matrix, self._pca_dim).ravel(), projection.A)
        projection.is_trained = True
        rng = np.random.default_rng(PCA_TRAIN_SEED)
        rows = PCA_TRAIN_ROWS
        if self._algorithm == "ivf_pca":
            rows = max(rows, IVF_TRAIN_ROWS_PER_LIST * self._nlist)
        sample = matrix
        if len(matrix) > rows:
            sample = matrix[np.sort(rng.choice(len(matrix), rows, replace=False))]
        sample = np.ascontiguousarray(sample)
        if self._algorithm == "ivf_pca":
            base.index.train(projection.apply(sample))
        faiss.downcast_index(refine.refine_index).train(sample)
        base.is_trained = refine.is_trained = index.is_trained = True

    def _compact(self) -> None:
        started = self._index.ntotal
        vectors = _renormalise_decoded(self._index.index.reconstruct_n(0, started))
        labels, _ = self._label_order()
        keep = ~np.isin(labels, self._tombstones)
        fresh = self._new_faiss_index()
        if keep.any():
            if not fresh.is_trained:
                self._train(fresh, np.ascontiguousarray(vectors[keep]))
            fresh.add_with_ids(np.ascontiguousarray(vectors[keep]), labels[keep])
        self._index = fresh
        self._search_index = fresh
        self._backing = None
        self._labels = None
        self._tombstones = np.empty(0, dtype=np.int64)
        self._selector = None
        logger.info(
            "rebuilt HNSW graph without tombstones: %d -> %d entries", started, fresh.ntotal
        )

    def reconstruct(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The stored vectors of live entries, float32 ``(len(ids), dim)`` in the order given.

        Exact for ``flat`` and ``hnsw``; for ``hnsw_pca`` and ``ivf_pca`` decoded from the
        re-ranking codes
        (float16: each component to about 5e-4 relative, so norms stay within
        :data:`UNIT_NORM_TOLERANCE` of 1 and re-adding them is lossless; 8-bit codes of older
        indexes are renormalised).

        Raises:
            KeyError: an id is not a live entry of this index.
        """
        wanted = check_ids(ids)
        if wanted.size == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        labels, order = self._label_order()
        found = np.searchsorted(labels, wanted, sorter=order)
        found = np.minimum(found, labels.size - 1)
        positions = order[found]
        missing = (labels[positions] != wanted) | np.isin(wanted, self._tombstones)
        if missing.any():
            raise KeyError(f"not in the index: {int(wanted[np.flatnonzero(missing)[0]])}")
        inner: Any = self._index.index
        return _renormalise_decoded(inner.reconstruct_batch(positions))

    def _label_order(self) -> tuple[IdArray, IdArray]:
        """FAISS position -> id labels and their ascending order (cached until a change)."""
        if self._labels is None:
            labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            self._labels = (labels, np.argsort(labels, kind="stable"))
        return self._labels

    def _own(self) -> None:
        """Give a zero-copy loaded index owned FAISS arrays before anything changes them."""
        if self._backing is None:
            return
        owned = faiss.deserialize_index(faiss.serialize_index(self._index))
        assert isinstance(owned, faiss.IndexIDMap)
        self._index = owned
        self._search_index = owned
        self._backing = None

    @property
    def zero_copy(self) -> bool:
        """True while the FAISS arrays are views into the buffer this index was loaded from."""
        return self._backing is not None

    def _drop_gpu_copy(self) -> None:
        if self._search_index is not self._index:
            logger.info("index changed; searching on CPU until use_gpu() is called again")
            self._search_index = self._index

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Hits with cosine >= ``threshold`` (in [-1, 1]), best first, at most ``k`` per query."""
        matrix = self._vectors(queries, "queries")
        k = check_k(k)
        floor = check_threshold(threshold, -1.0, 1.0, "cosine")
        if len(self) == 0:
            return [[] for _ in range(matrix.shape[0])]
        kk = min(k, len(self))
        if self._algorithm == "hnsw":
            # Attribute missing from faiss's bundled type stubs, present at runtime.
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(self._ef_search, kk)
            if self._tombstones.size:
                params.sel = self._tombstone_selector()
            scores, labels = self._search_index.search(matrix, kk, params=params)
        elif self._algorithm in _PROJECTED:
            base_params: Any
            if self._algorithm == "ivf_pca":
                base_params = faiss.SearchParametersIVF()
                base_params.nprobe = self._nprobe
            else:
                base_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
                base_params.efSearch = max(self._ef_search, kk * self._k_factor)
            if self._tombstones.size:
                # Below IndexIDMap the candidates are row positions, not entry ids.
                base_params.sel = self._tombstone_selector(positions=True)
            refine_params = faiss.IndexRefineSearchParameters()
            refine_params.k_factor = float(self._k_factor)
            refine_params.base_index_params = base_params
            scores, labels = self._search_index.search(matrix, kk, params=refine_params)
        else:
            scores, labels = self._search_index.search(matrix, kk)
        results: list[list[Hit]] = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            pairs = [
                (float(s), int(i))
                for s, i in zip(row_scores, row_labels, strict=True)
                if i >= 0 and s >= floor
            ]
            pairs.sort(key=lambda p: (-p[0], p[1]))
            results.append([Hit(i, s) for s, i in pairs])
        return results

    def _tombstone_selector(self, *, positions: bool = False) -> faiss.IDSelectorNot:
        if self._selector is None:
            dead = self._tombstones
            if positions:
                labels, _ = self._label_order()
                dead = np.flatnonzero(np.isin(labels, self._tombstones)).astype(np.int64)
            # Keep the batch selector referenced: IDSelectorNot holds a raw pointer to it.
            batch = faiss.IDSelectorBatch(dead)
            self._selector = (batch, faiss.IDSelectorNot(batch))
        return self._selector[1]

    def use_gpu(self, *, gpus: int | None = None) -> bool:
        """Search a GPU copy of a flat index when FAISS GPU and a GPU are available.

        The CPU index stays the source of truth: ``add``/``remove`` go to it and drop the GPU
        copy (call again afterwards). HNSW stays on CPU. See :func:`maybe_to_gpu`.

        Returns:
            Whether searches now run on a GPU.
        """
        if self._algorithm != "flat":
            logger.info("only flat indexes are moved to FAISS GPU here; searching on CPU")
            self._search_index = self._index
            return False
        self._search_index = maybe_to_gpu(self._index, gpus=gpus)
        return self._search_index is not self._index

    def _sections(self) -> dict[str, bytes]:
        sections = {"faiss": faiss.serialize_index(self._index).tobytes()}
        if self._algorithm != "flat":
            sections["tombstones"] = self._tombstones.astype("<i8").tobytes()
        return sections

    @classmethod
    def _from_sections(
        cls,
        dim: int,
        count: int,
        params: Mapping[str, Any],
        sections: Mapping[str, Buffer],
    ) -> Self:
        algorithm = params.get("algorithm")
        if algorithm not in _PARAM_KEYS:
            raise ValueError(f"unknown cosine index algorithm {algorithm!r}")
        if set(params) != _PARAM_KEYS[algorithm]:
            raise ValueError(f"cosine {algorithm} params must be {sorted(_PARAM_KEYS[algorithm])}")
        expected = {"faiss"} if algorithm == "flat" else {"faiss", "tombstones"}
        if set(sections) != expected:
            raise ValueError(f"cosine {algorithm} index needs sections {sorted(expected)}")
        index = cls(dim, **params)
        raw = np.frombuffer(sections["faiss"], dtype=np.uint8)
        try:
            if raw.flags.writeable and raw.size:
                # Zero-copy: FAISS's arrays become views into ``raw`` (kept alive below).
                # faiss's bundled stubs lack ZeroCopyIOReader (FAISS >= 1.10).
                reader = faiss.ZeroCopyIOReader(  # type: ignore[attr-defined]
                    faiss.swig_ptr(raw), raw.size
                )
                loaded = faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
                index._backing = raw
            else:  # read-only bytes: FAISS must not point into memory it may not own
                loaded = faiss.deserialize_index(raw)
        except RuntimeError as exc:
            raise ValueError(f"FAISS could not read the index: {exc}") from exc
        if not isinstance(loaded, faiss.IndexIDMap) or loaded.d != dim:
            raise ValueError(f"expected a {dim}-d FAISS IndexIDMap, got {type(loaded).__name__}")
        inner = faiss.downcast_index(loaded.index)
        if inner.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the FAISS index does not use inner product")
        if algorithm in _PROJECTED:
            candidates = _check_pca_layout(inner, dim, index._pca_dim)
            refine: Any = inner
            refine.k_factor = float(index._k_factor)
            inner = candidates
        if algorithm == "ivf_pca":
            if not isinstance(inner, faiss.IndexIVFScalarQuantizer) or inner.nlist != index._nlist:
                raise ValueError(f"expected an 8-bit IVF index with {index._nlist} lists")
            inner.nprobe = index._nprobe
        elif algorithm != "flat":
            if not isinstance(inner, faiss.IndexHNSWFlat):
                raise ValueError(f"expected IndexHNSWFlat, got {type(inner).__name__}")
            levels = faiss.vector_to_array(inner.hnsw.cum_nneighbor_per_level)
            if levels.size < 3 or int(levels[2] - levels[1]) != index._hnsw_m:
                raise ValueError("HNSW graph degree does not match the header's hnsw_m")
            inner.hnsw.efSearch = index._ef_search
        if algorithm != "flat":
            blob = sections["tombstones"]
            if len(blob) % 8:
                raise ValueError("tombstones section is not a whole number of int64")
            tombstones = np.frombuffer(blob, dtype="<i8").astype(np.int64)
        else:
            if type(inner) is not faiss.IndexFlatIP:
                raise ValueError(f"expected IndexFlatIP, got {type(inner).__name__}")
            tombstones = np.empty(0, dtype=np.int64)
        labels = faiss.vector_to_array(loaded.id_map).astype(np.int64)
        # One sort serves every check (numpy's hash-based unique took a second at 1M ids).
        order = np.argsort(labels, kind="stable")
        ordered = labels[order]
        tombstones = np.sort(tombstones)
        if labels.size != loaded.ntotal or _has_repeats(ordered):
            raise ValueError("the FAISS id map is inconsistent (wrong size or repeated ids)")
        found = np.searchsorted(ordered, tombstones)
        if (
            _has_repeats(tombstones)
            or not bool(np.all(found < ordered.size))
            or not np.array_equal(ordered[found], tombstones)
        ):
            raise ValueError("tombstones must be distinct ids present in the index")
        live = np.delete(ordered, found)
        if live.size != count:
            raise ValueError(f"header says {count} entries, index holds {live.size}")
        index._index = loaded
        index._search_index = loaded
        index._ids = live
        index._tombstones = tombstones
        index._labels = (labels, order)
        return index


def _has_repeats(ascending: IdArray) -> bool:
    """Whether a sorted id array holds a value twice."""
    return bool(ascending.size > 1 and np.any(ascending[1:] == ascending[:-1]))


def _check_pca_layout(refine: Any, dim: int, pca_dim: int) -> faiss.Index:
    """The candidate index inside an ``hnsw_pca`` or ``ivf_pca`` FAISS index, after checking
    the layout (``IndexRefine`` of ``IndexPreTransform(LinearTransform dim->pca_dim, HNSWFlat or
    IVFScalarQuantizer)`` and an
    ``IndexScalarQuantizer`` of width ``dim``: float16, or 8-bit in indexes built before).

    Raises:
        ValueError: any part is missing, of another type or of another width.
    """
    if not isinstance(refine, faiss.IndexRefine):
        raise ValueError(f"expected IndexRefine, got {type(refine).__name__}")
    base: Any = faiss.downcast_index(refine.base_index)
    codes = faiss.downcast_index(refine.refine_index)
    chain: Any = getattr(base, "chain", None)
    if not isinstance(base, faiss.IndexPreTransform) or chain is None or chain.size() != 1:
        raise ValueError("expected one projection before the HNSW graph")
    projection: Any = faiss.downcast_VectorTransform(chain.at(0))
    if (
        type(projection) is not faiss.LinearTransform
        or projection.d_in != dim
        or projection.d_out != pca_dim
    ):
        raise ValueError(f"expected a {dim}->{pca_dim} linear projection")
    if not isinstance(codes, faiss.IndexScalarQuantizer) or codes.d != dim:
        raise ValueError(f"expected a {dim}-d scalar quantiser for re-ranking")
    if codes.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("the re-ranking codes do not use inner product")
    candidates = faiss.downcast_index(base.index)
    if (
        not isinstance(candidates, faiss.IndexHNSWFlat | faiss.IndexIVFScalarQuantizer)
        or candidates.d != pca_dim
    ):
        raise ValueError(f"expected a {pca_dim}-d HNSW graph or IVF index")
    if candidates.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("the candidate index does not use inner product")
    return candidates


def maybe_to_gpu(index: _AnyIndex, *, gpus: int | None = None) -> _AnyIndex:
    """A GPU copy of a float FAISS index when FAISS GPU and a GPU exist, else ``index`` itself.

    FAISS GPU comes from the ``faiss-gpu-cu12`` extra (``pip install moderation[gpu]``); the
    ``faiss-cpu`` wheel lacks ``StandardGpuResources`` and ``index_cpu_to_gpu``, and then the
    index is returned unchanged. Flat indexes (also inside ``IndexIDMap``) are cloned to GPU 0,
    or sharded over several GPUs with ``index_cpu_to_all_gpus``; HNSW and binary indexes are
    returned unchanged (FAISS GPU has no HNSW; PDQ scans are cheap on CPU).

    This selection logic is tested on CPU with stand-in GPU symbols; it has never run on a
    real GPU in this project's development environment.

    Args:
        index: a CPU ``faiss.Index`` (or ``faiss.IndexBinary``, returned as is).
        gpus: how many GPUs to use; ``None`` asks ``faiss.get_num_gpus()``. 0 keeps the CPU.

    Raises:
        ValueError: ``gpus`` is negative.
    """
    if gpus is not None and (isinstance(gpus, bool) or gpus < 0):
        raise ValueError(f"gpus must be a non-negative integer or None, got {gpus!r}")
    if isinstance(index, faiss.IndexBinary):
        return index
    resources_cls = getattr(faiss, "StandardGpuResources", None)
    to_gpu = getattr(faiss, "index_cpu_to_gpu", None)
    to_all_gpus = getattr(faiss, "index_cpu_to_all_gpus", None)
    if resources_cls is None or to_gpu is None or to_all_gpus is None:
        logger.debug("FAISS was built without GPU support; keeping the index on CPU")
        return index
    count = faiss.get_num_gpus() if gpus is None else gpus
    if count <= 0:
        logger.debug("no GPU visible to FAISS; keeping the index on CPU")
        return index
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if not isinstance(inner, faiss.IndexFlat):
        logger.info("FAISS GPU supports flat indexes here, not %s", type(inner).__name__)
        return index
    if count == 1:
        moved: _AnyIndex = to_gpu(resources_cls(), 0, index)
    else:
        moved = to_all_gpus(index, ngpu=count)
    logger.info("moved a %d-entry FAISS index to %d GPU(s)", index.ntotal, count)
    return moved
