"""Cosine-similarity index over L2-normalised float32 embeddings (FAISS inner product).

Exact ``IndexFlatIP`` for small banks, HNSW over inner product (Malkov & Yashunin, "Efficient
and robust approximate nearest neighbor search using Hierarchical Navigable Small World
graphs", TPAMI 2018) for large ones, both inside ``IndexIDMap`` so FAISS returns entry ids.
The choice follows the FAISS wiki "Guidelines to choose an index": Flat when exact results are
needed, ``HNSWx`` when memory is not the constraint, and for the largest banks candidates
from vectors projected to fewer dimensions, re-ranked by full-width cosine: ``hnsw_pca``
(``PCA<p>,HNSW<M>,Refine(SQfp16)``) or, from :data:`PCA_MIN_ENTRIES` entries, ``ivf_pca``
(``PCA<256>,IVF<nlist>,SQ8,Refine(SQfp16)``). :mod:`moderation.banks.index.cosine_projection`
describes both layouts and the measurements behind them. From :data:`DISK_MIN_ENTRIES` entries,
when given a row directory, ``ivf_disk`` keeps the re-ranking rows out of RAM in an encrypted
row file (:mod:`moderation.banks.index.disk`).

Loading is zero-copy: a deserialized index's FAISS arrays (codes, graph) are views into the
caller's buffer (FAISS ``ZeroCopyIOReader`` with ``IO_FLAG_MMAP_IFC``), which the index keeps
alive; the first change (add, remove) makes an owned copy, because FAISS aborts the process on
a resize of a viewed array.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
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
from moderation.banks.index.cosine_layout import check_inner, new_faiss_index, search_params
from moderation.banks.index.cosine_params import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    PARAM_KEYS,
    PARAM_ORDER,
    PROJECTED,
    TOMBSTONE_COMPACT_FRACTION,
    Algorithm,
    check_header,
    check_unit_norm,
    positive_int,
    renormalise_decoded,
)
from moderation.banks.index.cosine_projection import (
    IVF_NPROBE,
    IVF_PCA_DIM,
    PCA_DIM,
    PCA_EF_SEARCH,
    REFINE_K_FACTOR,
    ivf_nlist,
    train_projected,
)
from moderation.banks.index.disk import DiskIvf
from moderation.banks.index.gpu import maybe_to_gpu
from moderation.banks.index.loading import (
    check_id_map,
    read_faiss,
    tombstones_from,
)

logger = logging.getLogger(__name__)

#: Bank size (entries) from which ``build(algorithm="auto")`` uses HNSW instead of an exact
#: scan. Below it the scan is cheap and exact: FAISS ``IndexFlatIP`` is memory-bound at about
#: 53 ms per query for 100k x 1280-d on the 2-core development machine (BENCHMARKS.md), so
#: about 27 ms at 50k, and 22 ms was measured for 100k x 512-d. Above it the scan grows linearly
#: with the bank while HNSW stays near 1-2 ms per query (1.8 ms measured at 100k x 512-d).
HNSW_MIN_ENTRIES: Final = 50_000

#: Bank size from which ``build(algorithm="auto")`` uses ``ivf_pca`` for vectors wider than
#: :data:`IVF_PCA_DIM`: the same size as HNSW, because at 100k x 1280-d the projected indexes
#: measured better on every count than ``hnsw`` (recall@10 0.99 vs 0.97 with efSearch 128,
#: fewer bytes per entry, a fraction of the snapshot load time); plain ``hnsw`` remains for
#: narrow vectors.
PCA_MIN_ENTRIES: Final = HNSW_MIN_ENTRIES

#: Bank size from which ``build(algorithm="auto", row_dir=...)`` uses ``ivf_disk``: at 1M
#: entries ``ivf_pca`` holds 2.8 GB per worker (measured, README "Banks past one machine's
#: memory"), ``ivf_disk`` about 0.4 GB at the same recall@10 for 3 ms more per query.
DISK_MIN_ENTRIES: Final = 1_000_000


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
        row_dir: Path | None = None,
        row_name: str | None = None,
    ) -> None:
        """An empty index of ``dim``-wide vectors; see :meth:`build` for the parameters."""
        if algorithm not in PARAM_KEYS:
            raise ValueError(f"algorithm must be one of {sorted(PARAM_KEYS)}, got {algorithm!r}")
        if pca_dim is None:
            pca_dim = IVF_PCA_DIM if algorithm in ("ivf_pca", "ivf_disk") else PCA_DIM
        self._dim = positive_int(dim, "dim")
        self._algorithm: Algorithm = algorithm
        self._hnsw_m = positive_int(hnsw_m, "hnsw_m")
        self._ef_construction = positive_int(ef_construction, "ef_construction")
        self._ef_search = positive_int(ef_search, "ef_search")
        self._pca_dim = positive_int(pca_dim, "pca_dim")
        self._k_factor = positive_int(k_factor, "k_factor")
        self._nlist = positive_int(nlist, "nlist")
        self._nprobe = positive_int(nprobe, "nprobe")
        if algorithm in (*PROJECTED, "ivf_disk") and self._pca_dim >= self._dim:
            raise ValueError(f"pca_dim ({self._pca_dim}) must be below dim ({self._dim})")
        self._disk: DiskIvf | None = None
        if algorithm == "ivf_disk":
            self._disk = DiskIvf(dim, self._pca_dim, self._nlist, self._nprobe, self._k_factor)
            if row_dir is not None:
                self._disk.attach_new_rows(Path(row_dir), row_name)
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
        row_dir: Path | None = None,
        row_name: str | None = None,
        **params: Any,
    ) -> Self:
        """Build from ``(n,)`` int ids and ``(n, dim)`` float32 unit vectors.

        Args:
            algorithm: ``"flat"`` (exact), ``"hnsw"``, ``"hnsw_pca"`` / ``"ivf_pca"`` (projected
                HNSW / IVF candidates re-ranked by full-width cosine), ``"ivf_disk"`` (IVF ones
                re-ranked from an encrypted row file, :mod:`.disk`) or ``"auto"``: for ``dim >
                IVF_PCA_DIM`` ``ivf_disk`` from ``DISK_MIN_ENTRIES`` with a ``row_dir``, else
                ``ivf_pca`` from ``PCA_MIN_ENTRIES``; else HNSW from ``HNSW_MIN_ENTRIES``, else
                flat. Fixed for the index's life.
            hnsw_m, ef_construction, ef_search: HNSW parameters, in the header (``ef_search``
                defaults to :data:`HNSW_EF_SEARCH`, :data:`PCA_EF_SEARCH` for ``hnsw_pca``).
            pca_dim, k_factor, nlist, nprobe: projected width (learned from these vectors;
                default :data:`PCA_DIM`, :data:`IVF_PCA_DIM` for IVF), re-ranked candidates per
                result, IVF lists (default :func:`ivf_nlist` of n, fixed) and lists probed.
            row_dir, row_name: ``ivf_disk``'s new row file (default ``rows-<uuid>.rows``); its
                key is in :meth:`serialize`'s bytes: keep those in an encrypted snapshot.

        Raises:
            ValueError: malformed input (:class:`SignalIndex`), non-unit vectors, unknown params.
        """
        if params:
            raise ValueError(f"unknown CosineIndex parameter(s): {sorted(params)}")
        matrix = check_matrix(vectors, dtype=np.float32, dim=None, what="vectors")
        n = len(matrix)
        chosen = _choose_algorithm(algorithm, n, matrix.shape[1], pca_dim, row_dir is not None)
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
            row_dir=row_dir,
            row_name=row_name,
        )
        index.add(ids, matrix)
        return index

    def _new_faiss_index(self) -> faiss.IndexIDMap:
        return new_faiss_index(self._dim, self._settings())

    @property
    def dim(self) -> int:
        """Vector width (floats)."""
        return self._dim

    @property
    def algorithm(self) -> Algorithm:
        """``"flat"`` (exact), ``"hnsw"``, ``"hnsw_pca"``, ``"ivf_pca"`` or ``"ivf_disk"``."""
        return self._algorithm

    @property
    def row_path(self) -> Path | None:
        """``ivf_disk``: the open row file's path (else None)."""
        rows = self._disk.rows if self._disk is not None else None
        return rows.path if rows is not None else None

    @property
    def disk(self) -> DiskIvf | None:
        """``ivf_disk``: its candidate index and row file, whose search-time settings
        (``rerank_factor``, ``residual_weight``) can be changed (else None)."""
        return self._disk

    def open_rows(self, row_dir: Path) -> None:
        """``ivf_disk`` loaded from bytes: open the row file they name in ``row_dir``,
        read-only (no row is read). Raises RowFileError (a ValueError): missing, another
        version's, or truncated. Other algorithms: nothing to do."""
        if self._disk is not None:
            self._disk.open_rows(Path(row_dir))

    def _settings(self) -> dict[str, ParamValue]:
        return {
            "algorithm": self._algorithm,
            "hnsw_m": self._hnsw_m,
            "ef_construction": self._ef_construction,
            "ef_search": self._ef_search,
            "pca_dim": self._pca_dim,
            "k_factor": self._k_factor,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
        }

    @property
    def params(self) -> dict[str, ParamValue]:
        """The header parameters of the algorithm (``PARAM_ORDER``), ``algorithm`` first."""
        every = self._settings()
        return {key: every[key] for key in PARAM_ORDER[self._algorithm]}

    @property
    def tombstones(self) -> int:
        """Removed entries still in the HNSW graph (always 0 for flat)."""
        return int(self._tombstones.size)

    def _vectors(self, vectors: npt.ArrayLike, what: str) -> npt.NDArray[np.float32]:
        matrix = check_matrix(vectors, dtype=np.float32, dim=self._dim, what=what)
        check_unit_norm(matrix, what)
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
        if self._disk is not None:
            self._disk.add(new_ids, matrix)
            self._ids = merge_sorted(self._ids, new_ids)
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
        if self._disk is not None:
            self._disk.own()
            self._disk.remove(present)
        elif self._algorithm == "flat":
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
        train_projected(
            index,
            matrix,
            ivf=self._algorithm == "ivf_pca",
            pca_dim=self._pca_dim,
            nlist=self._nlist,
        )

    def _compact(self) -> None:
        started = self._index.ntotal
        vectors = renormalise_decoded(self._index.index.reconstruct_n(0, started))
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
        re-ranking codes (float16: each component to about 5e-4 relative, so norms stay within
        :data:`~moderation.banks.index.cosine_params.UNIT_NORM_TOLERANCE` of 1 and re-adding
        them is lossless; 8-bit codes of older indexes are renormalised).

        Raises:
            KeyError: an id is not a live entry of this index.
        """
        wanted = check_ids(ids)
        if wanted.size == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        if self._disk is not None:
            return self._disk.reconstruct(wanted)
        labels, order = self._label_order()
        found = np.searchsorted(labels, wanted, sorter=order)
        found = np.minimum(found, labels.size - 1)
        positions = order[found]
        missing = (labels[positions] != wanted) | np.isin(wanted, self._tombstones)
        if missing.any():
            raise KeyError(f"not in the index: {int(wanted[np.flatnonzero(missing)[0]])}")
        inner: Any = self._index.index
        return renormalise_decoded(inner.reconstruct_batch(positions))

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
        if self._disk is not None:
            scores, labels = self._disk.search(matrix, kk, self._nprobe)
        else:
            selector = None
            if self._tombstones.size:
                # Below IndexIDMap the candidates of projected indexes are row positions.
                selector = self._tombstone_selector(positions=self._algorithm in PROJECTED)
            params = search_params(self._settings(), kk, selector)
            scores, labels = self._search_index.search(matrix, kk, params=params)
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

    def serves_version(self, snapshot_id: str | None, version: int) -> None:
        """The holding blocklist moved to ``snapshot_id``/``version`` in place: nothing to do
        here; :class:`moderation.banks.shard_index.ShardedCosineIndex` asks its shards for it."""

    def use_gpu(self, *, gpus: int | None = None) -> bool:
        """Search a GPU copy of a flat index when FAISS GPU and a GPU are available (others
        stay on CPU; ``add``/``remove`` drop the copy: call again). See :func:`maybe_to_gpu`.
        Returns whether searches now run on a GPU."""
        if self._algorithm != "flat":
            logger.info("only flat indexes are moved to FAISS GPU here; searching on CPU")
            self._search_index = self._index
            return False
        self._search_index = maybe_to_gpu(self._index, gpus=gpus)
        return self._search_index is not self._index

    def _sections(self) -> dict[str, bytes]:
        if self._disk is not None:
            return self._disk.sections()
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
        check_header(params, sections)
        index = cls(dim, **params)
        if params["algorithm"] == "ivf_disk":
            index._disk = DiskIvf.from_sections(dim, dict(params), dict(sections), count)
            index._ids = np.sort(index._disk.labels[index._disk.labels >= 0])
            return index
        loaded, index._backing = read_faiss(sections["faiss"], dim)
        check_inner(faiss.downcast_index(loaded.index), dim, index._settings())
        # A flat index has no tombstones section (checked above): none are dead.
        tombstones = tombstones_from(sections.get("tombstones", b""))
        labels, order, live, tombstones = check_id_map(loaded, tombstones, count)
        index._index = loaded
        index._search_index = loaded
        index._ids = live
        index._tombstones = tombstones
        index._labels = (labels, order)
        return index


def _choose_algorithm(
    algorithm: Algorithm | Literal["auto"], n: int, dim: int, pca_dim: int | None, rows: bool
) -> Algorithm:
    """``algorithm``, or for ``"auto"`` the choice :meth:`CosineIndex.build` documents."""
    if algorithm != "auto":
        return algorithm
    if rows and n >= DISK_MIN_ENTRIES and dim > (pca_dim or IVF_PCA_DIM):
        return "ivf_disk"
    if n >= PCA_MIN_ENTRIES and dim > (pca_dim or IVF_PCA_DIM):
        return "ivf_pca"
    return "hnsw" if n >= HNSW_MIN_ENTRIES else "flat"
