"""Signal index GPU selection (no GPU here: FAISS GPU symbols are stand-ins)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest

from moderation.banks.index import (
    CosineIndex,
    maybe_to_gpu,
)
from tests.unit.conftest import (
    unit_vectors,
)

# --- GPU selection (no GPU here: FAISS GPU symbols are stand-ins) ----------------------------


class FakeGpuIndex:
    """Stands in for a FAISS GPU index: delegates to the CPU index and counts searches."""

    def __init__(self, cpu: faiss.Index) -> None:
        self.cpu = cpu
        self.searches = 0
        self.ntotal = cpu.ntotal

    def search(self, x: np.ndarray, k: int, **kwargs: Any) -> Any:
        self.searches += 1
        return self.cpu.search(x, k, **kwargs)


class FakeGpuFaiss:
    """Installs the FAISS GPU entry points ``maybe_to_gpu`` looks up, recording their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, visible_gpus: int) -> None:
        self.single: list[int] = []
        self.sharded: list[int] = []
        self.made: list[FakeGpuIndex] = []
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self._to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self._to_all, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: visible_gpus)

    def _to_gpu(self, resources: object, device: int, index: faiss.Index) -> FakeGpuIndex:
        self.single.append(device)
        self.made.append(FakeGpuIndex(index))
        return self.made[-1]

    def _to_all(self, index: faiss.Index, ngpu: int) -> FakeGpuIndex:
        self.sharded.append(ngpu)
        self.made.append(FakeGpuIndex(index))
        return self.made[-1]


def _flat_faiss() -> faiss.Index:
    return faiss.IndexIDMap(faiss.IndexFlatIP(8))


def test_gpu_absent_symbols_keep_the_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("StandardGpuResources", "index_cpu_to_gpu", "index_cpu_to_all_gpus"):
        monkeypatch.delattr(faiss, name, raising=False)
    index = _flat_faiss()
    assert maybe_to_gpu(index) is index
    assert maybe_to_gpu(index, gpus=4) is index


def test_gpu_selection_follows_the_visible_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=0)
    index = _flat_faiss()
    assert maybe_to_gpu(index) is index
    assert maybe_to_gpu(index, gpus=0) is index
    assert isinstance(maybe_to_gpu(index, gpus=1), FakeGpuIndex)
    assert isinstance(maybe_to_gpu(index, gpus=3), FakeGpuIndex)
    assert fake.single == [0]
    assert fake.sharded == [3]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert isinstance(maybe_to_gpu(index), FakeGpuIndex)
    assert fake.sharded == [3, 2]
    with pytest.raises(ValueError, match="gpus"):
        maybe_to_gpu(index, gpus=-1)


def test_gpu_leaves_hnsw_and_binary_indexes_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=1)
    hnsw = faiss.IndexIDMap(faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT))
    binary = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(256))
    assert maybe_to_gpu(hnsw) is hnsw
    assert maybe_to_gpu(binary) is binary
    assert isinstance(maybe_to_gpu(faiss.IndexFlatIP(8)), FakeGpuIndex)
    assert fake.single == [0]


def test_cosine_index_searches_the_gpu_copy_until_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeGpuFaiss(monkeypatch, visible_gpus=1)
    rng = np.random.default_rng(15)
    vectors = unit_vectors(rng, 50, 8)
    index = CosineIndex.build(np.arange(50), vectors)
    cpu_results = index.search(vectors, 3, 0.0)
    assert index.use_gpu() is True
    assert index.search(vectors, 3, 0.0) == cpu_results
    assert fake.made[0].searches == 1
    index.add(np.array([99]), unit_vectors(rng, 1, 8))
    index.search(vectors, 3, 0.0)
    assert fake.made[0].searches == 1  # changed: back on the CPU index
    assert index.use_gpu(gpus=0) is False
    hnsw = CosineIndex.build(np.arange(50), vectors, algorithm="hnsw")
    assert hnsw.use_gpu() is False
