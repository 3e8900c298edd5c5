"""Signal index removal: removed cosine and Hamming entries are never returned, HNSW
tombstones compact.
"""

from __future__ import annotations

import numpy as np
import pytest

from moderation.banks.index import (
    TOMBSTONE_COMPACT_FRACTION,
    CosineIndex,
    HammingIndex,
)
from tests.unit.conftest import (
    unit_vectors,
)

# --- removal --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["flat", "hnsw"])
def test_removed_cosine_entries_are_never_returned(algorithm: str) -> None:
    rng = np.random.default_rng(4)
    vectors = unit_vectors(rng, 400, 16)
    ids = np.arange(1000, 1400)
    index = CosineIndex.build(ids, vectors, algorithm=algorithm)  # type: ignore[arg-type]
    removed = ids[::10]  # 10%: below the compaction fraction, so HNSW keeps tombstones
    assert index.remove([*removed.tolist(), 5, int(removed[0])]) == removed.size
    assert index.remove(removed.tolist()) == 0
    assert len(index) == 360
    assert index.tombstones == (removed.size if algorithm == "hnsw" else 0)
    results = index.search(vectors, 400, -1.0)
    returned = {h.id for hits in results for h in hits}
    assert returned.isdisjoint(removed.tolist())
    assert returned == set(ids.tolist()) - set(removed.tolist())
    # Each remaining entry is still its own nearest neighbour.
    for row, hits in zip(range(400), results, strict=True):
        if ids[row] not in removed:
            assert hits[0].id == ids[row]


def test_hnsw_compacts_when_tombstones_pile_up() -> None:
    rng = np.random.default_rng(5)
    vectors = unit_vectors(rng, 200, 16)
    ids = np.arange(200)
    index = CosineIndex.build(ids, vectors, algorithm="hnsw")
    index.remove(range(0, 200, 10))
    index.remove(range(1, 200, 10))
    assert index.tombstones == 40  # exactly the compaction fraction: not yet over it
    assert TOMBSTONE_COMPACT_FRACTION * 200 == 40
    index.remove(range(2, 200, 10))
    assert index.tombstones == 0
    assert len(index) == 140
    survivors = [i for i in range(200) if i % 10 > 2]
    hits = index.search(vectors[survivors], 1, 0.99)
    assert [h[0].id for h in hits] == survivors
    returned = {h.id for row in index.search(vectors, 200, -1.0) for h in row}
    assert returned == set(survivors)


def test_hnsw_readding_a_removed_id_forgets_its_old_vector() -> None:
    rng = np.random.default_rng(6)
    vectors = unit_vectors(rng, 300, 16)
    index = CosineIndex.build(np.arange(300), vectors, algorithm="hnsw")
    index.remove([7])
    replacement = unit_vectors(rng, 1, 16)
    index.add(np.array([7]), replacement)
    assert index.tombstones == 0
    old_hits = index.search(vectors[7:8], 300, -1.0)[0]
    assert [h.id for h in old_hits].count(7) == 1
    assert index.search(replacement, 1, 0.99)[0][0].id == 7


def test_removed_hamming_entries_are_never_returned() -> None:
    rng = np.random.default_rng(7)
    digests = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
    ids = np.arange(300) * 7
    index = HammingIndex.build(ids, digests)
    removed = ids[rng.choice(300, size=60, replace=False)]
    assert index.remove(iter(removed.tolist())) == 60
    assert len(index) == 240
    results = index.search(digests, 300, 256)
    returned = {h.id for hits in results for h in hits}
    assert returned == set(ids.tolist()) - set(removed.tolist())


def test_remove_rejects_non_integers() -> None:
    index = HammingIndex.build(np.arange(2), np.zeros((2, 32), np.uint8))
    for bad in (["1"], [1.0], [True], [2**64]):
        with pytest.raises(ValueError, match="ids"):
            index.remove(bad)  # type: ignore[arg-type]
