"""The web tier's PDQ scan (:mod:`moderation.banks.pdq_scan`, NumPy) answers exactly what the
FAISS :class:`HammingIndex` answers, in both of its algorithms; and constants the web tier keeps
away from FAISS stay equal to their FAISS-side sources."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.banks.index import HNSW_MIN_ENTRIES, HammingIndex
from moderation.banks.pdq_scan import PdqScan
from moderation.banks.versions import STORED_INDEX_MIN_ENTRIES
from tests.unit.conftest import random_ids
from tests.unit.test_index_hamming import flip_bits


@pytest.mark.parametrize("algorithm", ["flat", "mih"])
def test_the_scan_returns_what_the_hamming_index_returns(algorithm: str) -> None:
    rng = np.random.default_rng(21)
    digests = rng.integers(0, 256, size=(3000, 32), dtype=np.uint8)
    # Near copies and exact duplicates of some digests: ties at every distance.
    digests[2000:2300] = [flip_bits(rng, digests[i % 50], i % 40) for i in range(300)]
    digests[2300:2400] = digests[:100]
    ids = random_ids(rng, 3000)
    scan = PdqScan(ids, digests)
    index = HammingIndex.build(ids, digests, algorithm=algorithm)  # type: ignore[arg-type]
    queries = np.concatenate([digests[:20], rng.integers(0, 256, size=(5, 32), dtype=np.uint8)])
    for query in queries:
        for k, threshold in ((1, 31), (5, 31), (1000, 31), (10, 0), (3000, 256), (4, 110)):
            expected = [
                (hit.id, int(hit.score)) for hit in index.search(query[None], k, threshold)[0]
            ]
            assert scan.search(query.tobytes(), k, threshold) == expected


def test_an_empty_scan_finds_nothing_and_bad_input_is_refused() -> None:
    empty = PdqScan(np.empty(0, np.int64), np.empty((0, 32), np.uint8))
    assert len(empty) == 0 and empty.search(bytes(32), 10, 31) == []
    with pytest.raises(ValueError, match="32 bytes"):
        empty.search(bytes(31), 10, 31)
    with pytest.raises(ValueError, match="threshold"):
        empty.search(bytes(32), 10, 257)
    with pytest.raises(ValueError, match="unique"):
        PdqScan(np.array([1, 1]), np.zeros((2, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        PdqScan(np.array([1, 2]), np.zeros((2, 16), np.uint8))


def test_the_stored_index_threshold_is_the_hnsw_threshold() -> None:
    """versions.py copies the number so that writing a small bank's snapshot needs no FAISS."""
    assert STORED_INDEX_MIN_ENTRIES == HNSW_MIN_ENTRIES
