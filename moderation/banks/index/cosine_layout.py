"""Creating and checking the FAISS index inside a :class:`~moderation.banks.index.cosine.
CosineIndex` from its settings (``algorithm``, ``hnsw_m``, ``ef_construction``, ``ef_search``,
``pca_dim``, ``k_factor``, ``nlist``, ``nprobe``; see ``CosineIndex.build``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faiss

from moderation.banks.index.cosine_params import PROJECTED
from moderation.banks.index.cosine_projection import (
    check_pca_layout,
    new_projected_index,
    projected_search_params,
)
from moderation.banks.index.loading import check_hnsw, check_ivf


def new_faiss_index(dim: int, settings: Mapping[str, Any]) -> faiss.IndexIDMap:
    """An empty ``IndexIDMap`` over the algorithm's FAISS index (``ivf_disk``: an empty
    exact one, unused: its candidates live in :class:`~moderation.banks.index.disk.DiskIvf`)."""
    algorithm = settings["algorithm"]
    inner: faiss.Index
    if algorithm in PROJECTED:
        return new_projected_index(
            dim,
            settings["pca_dim"],
            ivf=algorithm == "ivf_pca",
            nlist=settings["nlist"],
            nprobe=settings["nprobe"],
            hnsw_m=settings["hnsw_m"],
            ef_construction=settings["ef_construction"],
            ef_search=settings["ef_search"],
            k_factor=settings["k_factor"],
        )
    if algorithm == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, settings["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = settings["ef_construction"]
        hnsw.hnsw.efSearch = settings["ef_search"]
        inner = hnsw
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap(inner)


def check_inner(inner: Any, dim: int, settings: Mapping[str, Any]) -> None:
    """Check a loaded FAISS index below its ``IndexIDMap`` against the settings, and give it
    their search settings. Raises ValueError."""
    algorithm = settings["algorithm"]
    if algorithm in PROJECTED:
        candidates = check_pca_layout(inner, dim, settings["pca_dim"])
        refine: Any = inner
        refine.k_factor = float(settings["k_factor"])
        inner = candidates
    if algorithm == "ivf_pca":
        check_ivf(inner, settings["nlist"], settings["nprobe"])
    elif algorithm != "flat":
        check_hnsw(inner, settings["hnsw_m"], settings["ef_search"])
    elif type(inner) is not faiss.IndexFlatIP:
        raise ValueError(f"expected IndexFlatIP, got {type(inner).__name__}")


def search_params(settings: Mapping[str, Any], k: int, selector: Any) -> Any:
    """FAISS search parameters for ``k`` results: HNSW's ``efSearch`` (at least ``k``), or a
    projected index's (:func:`projected_search_params`, ``k x k_factor`` candidates), with the
    ``IDSelector`` of entries to skip (or None); None for flat."""
    algorithm = settings["algorithm"]
    if algorithm == "hnsw":
        # Attribute missing from faiss's bundled type stubs, present at runtime.
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(settings["ef_search"], k)
        if selector is not None:
            params.sel = selector
        return params
    if algorithm in PROJECTED:
        return projected_search_params(
            ivf=algorithm == "ivf_pca",
            nprobe=settings["nprobe"],
            ef_search=max(settings["ef_search"], k * settings["k_factor"]),
            k_factor=settings["k_factor"],
            selector=selector,
        )
    return None
