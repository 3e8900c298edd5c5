"""The projected cosine indexes (``hnsw_pca`` and ``ivf_pca`` of
:mod:`moderation.banks.index.cosine`): sizing the inverted file, learning the projection,
training the FAISS parts, and checking the layout of a loaded one.

``hnsw_pca`` is ``PCA<p>,HNSW<M>,Refine(SQfp16)``: candidates from an HNSW graph over vectors
projected to ``p`` dimensions (a projection learned from the bank when the index is built),
re-ranked by cosine over the full-width vectors stored as float16 codes (FAISS
``IndexRefine``; Jégou, Douze and Schmid, "Product quantization for nearest neighbor search",
TPAMI 2011, section on re-ranking).
Scores stay full-width cosines (float16: error about 1e-4), so policy thresholds keep their
meaning, at about 3.3 KB per entry instead of 5.4 KB. 8-bit codes (2.1 KB per entry) were
measured first and dropped: their ranking error (about 2e-3) swaps near-tied neighbours, recall@10
against exact search 0.985 instead of 0.994 at 100k generated entries (``moderation benchmark
speed``'s vectors, efSearch 256, 32 candidates per result).

For banks from :data:`~moderation.banks.index.cosine.PCA_MIN_ENTRIES` entries ``build`` chooses
``PCA<256>,IVF<nlist>,SQ8,Refine(SQfp16)`` (``ivf_pca``): the same projection and re-ranking, with
candidates from an inverted file (Jégou, Douze and Schmid, TPAMI 2011, section 4: k-means lists
over the projections, :data:`IVF_NPROBE` lists scanned with 8-bit codes) instead of an HNSW graph.
At 1M generated entries the graph's candidates missed true neighbours in these dense clusters of
near-duplicates (recall@10 0.82 with 128-d, 0.97 with 256-d projections and 2560 candidates at p99
9 ms), while the inverted file reached 0.9965 at p99 0.65 ms, built in a third of the time and at
2.8 instead of 3.4 KB per entry. ``hnsw_pca`` stays readable and can be asked for.
"""

from __future__ import annotations

from typing import Any, Final

import faiss
import numpy as np
import numpy.typing as npt

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

#: Candidates per wanted result that the refine stage re-ranks (k x 32 for ``hnsw_pca``).
REFINE_K_FACTOR: Final = 32

#: HNSW candidate-list size of ``hnsw_pca`` searches (raised to ``k * k_factor``).
PCA_EF_SEARCH: Final = 512

#: Training rows per inverted list for the k-means of ``ivf_pca`` (FAISS warns below 39).
IVF_TRAIN_ROWS_PER_LIST: Final = 64

#: Rows sampled (seeded) to learn the projection (and an 8-bit quantiser's ranges, for indexes
#: built before float16 codes).
PCA_TRAIN_ROWS: Final = 50_000
PCA_TRAIN_SEED: Final = 20240607


def ivf_nlist(entries: int) -> int:
    """Inverted lists for ``ivf_pca`` over ``entries`` vectors: the power of two nearest
    ``2 * sqrt(entries)``, within [64, 65536] (the FAISS wiki "Guidelines to choose an index"
    suggests 4 to 16 x sqrt(n) for its IVF scans; fewer, larger lists here because
    :data:`~moderation.banks.index.cosine.IVF_NPROBE` lists are scanned with 8-bit codes and
    re-ranked: 2048 at 1M entries)."""
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


def new_projected_index(
    dim: int,
    pca_dim: int,
    *,
    ivf: bool,
    nlist: int,
    nprobe: int,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
    k_factor: int,
) -> faiss.IndexIDMap:
    """An empty, untrained ``IndexIDMap(IndexRefine(IndexPreTransform(LinearTransform
    dim->pca_dim, candidates), float16 codes of width dim))``; the candidates are an 8-bit
    ``IndexIVFScalarQuantizer`` of ``nlist`` lists (``ivf``) or an ``IndexHNSWFlat``."""
    projection = faiss.LinearTransform(dim, pca_dim, False)
    candidates: faiss.Index
    if ivf:
        # Lists scanned with 8-bit codes: candidates only, re-ranked below.
        ivf_index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(pca_dim),
            pca_dim,
            nlist,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        ivf_index.nprobe = nprobe
        candidates = ivf_index
    else:
        graph = faiss.IndexHNSWFlat(pca_dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.hnsw.efSearch = ef_search
        candidates = graph
    codes = faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    refine = faiss.IndexRefine(faiss.IndexPreTransform(projection, candidates), codes)
    refine.k_factor = float(k_factor)
    # faiss's Python constructors keep references to the parts they are given.
    return faiss.IndexIDMap(refine)


def train_projected(
    index: faiss.IndexIDMap,
    matrix: npt.NDArray[np.float32],
    *,
    ivf: bool,
    pca_dim: int,
    nlist: int,
) -> None:
    """Learn a projected index's projection, its inverted lists' centroids and 8-bit
    ranges (``ivf``: ``ivf_pca``, FAISS k-means) and the re-ranking quantiser from ``matrix``
    (float32, (n, d) unit vectors).

    Raises:
        ValueError: ``ivf_pca`` with fewer rows than inverted lists.
    """
    if ivf and len(matrix) < nlist:
        raise ValueError(
            f"ivf_pca needs at least nlist={nlist} vectors in its first add, got {len(matrix)}"
        )
    # faiss's bundled stubs lack IndexRefine/IndexPreTransform members: typed as Any.
    refine: Any = faiss.downcast_index(index.index)
    base: Any = faiss.downcast_index(refine.base_index)
    projection: Any = faiss.downcast_VectorTransform(base.chain.at(0))
    faiss.copy_array_to_vector(learn_projection(matrix, pca_dim).ravel(), projection.A)
    projection.is_trained = True
    rng = np.random.default_rng(PCA_TRAIN_SEED)
    rows = PCA_TRAIN_ROWS
    if ivf:
        rows = max(rows, IVF_TRAIN_ROWS_PER_LIST * nlist)
    sample = matrix
    if len(matrix) > rows:
        sample = matrix[np.sort(rng.choice(len(matrix), rows, replace=False))]
    sample = np.ascontiguousarray(sample)
    if ivf:
        base.index.train(projection.apply(sample))
    faiss.downcast_index(refine.refine_index).train(sample)
    base.is_trained = refine.is_trained = index.is_trained = True


def check_pca_layout(refine: Any, dim: int, pca_dim: int) -> faiss.Index:
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


def projected_search_params(
    *, ivf: bool, nprobe: int, ef_search: int, k_factor: int, selector: Any
) -> faiss.IndexRefineSearchParameters:
    """Search parameters of a projected index: ``nprobe`` lists (``ivf``) or an HNSW
    candidate list of ``ef_search``, ``k_factor`` candidates per result re-ranked, and the
    FAISS ``IDSelector`` of row positions to skip (or None)."""
    base_params: Any
    if ivf:
        base_params = faiss.SearchParametersIVF()
        base_params.nprobe = nprobe
    else:
        base_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        base_params.efSearch = ef_search
    if selector is not None:
        base_params.sel = selector
    refine_params = faiss.IndexRefineSearchParameters()
    refine_params.k_factor = float(k_factor)
    refine_params.base_index_params = base_params
    return refine_params
