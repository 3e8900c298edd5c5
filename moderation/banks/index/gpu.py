"""GPU copies of FAISS indexes, when FAISS GPU and a GPU are available."""

from __future__ import annotations

import logging
from typing import TypeVar

import faiss

logger = logging.getLogger(__name__)

_AnyIndex = TypeVar("_AnyIndex", faiss.Index, faiss.IndexBinary)


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
