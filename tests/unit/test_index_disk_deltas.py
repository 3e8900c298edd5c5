"""A loaded ``ivf_disk`` index takes delta changes in place (added rows in RAM beside its
read-only row file, removals from the inverted lists), and compaction streams it into a new
row file with its training reused (:mod:`moderation.banks.disk_compaction`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from moderation.banks.disk_compaction import streamed_index
from moderation.banks.index import CosineIndex, load_index
from moderation.banks.rowfile import RowFileError

DIM = 384
CLUSTER = 8  # near-duplicates per centre: a query's top-8 are its centre's members


def _unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _bank(centres: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``centres x CLUSTER`` unit vectors (cluster by cluster) and the centres."""
    rng = np.random.default_rng(seed)
    middle = _unit(rng.standard_normal((centres, DIM)).astype(np.float32))
    noise = rng.standard_normal((centres, CLUSTER, DIM)).astype(np.float32) * (0.3 / np.sqrt(DIM))
    return _unit((middle[:, None, :] + noise).reshape(-1, DIM)), middle


def _hit_ids(index: CosineIndex, queries: npt.NDArray[np.float32], k: int) -> list[set[int]]:
    return [{hit.id for hit in hits} for hits in index.search(queries, k, -1.0)]


@pytest.fixture
def chain(tmp_path: Path) -> tuple[CosineIndex, dict[str, npt.NDArray]]:  # type: ignore[type-arg]
    """A full version's ``ivf_disk`` index of 3,000 entries loaded from its bytes (as a worker
    loads it), then a delta applied in place: 160 entries added, 400 removed."""
    base, base_centres = _bank(375, seed=1)
    ids = np.arange(len(base), dtype=np.int64) + 100
    built = CosineIndex.build(
        ids, base, algorithm="ivf_disk", nlist=16, nprobe=16, row_dir=tmp_path / "v1"
    )
    loaded = load_index(built.serialize(), authenticated=True, row_dir=tmp_path / "v1")
    assert isinstance(loaded, CosineIndex)
    added, added_centres = _bank(20, seed=2)
    added_ids = np.arange(len(added), dtype=np.int64) + 50_000
    loaded.add(added_ids, added)
    removed = ids[: 50 * CLUSTER]  # the first 50 clusters
    assert loaded.remove(removed.tolist()) == removed.size
    return loaded, {
        "ids": ids,
        "vectors": base,
        "centres": base_centres,
        "added": added,
        "added_ids": added_ids,
        "added_centres": added_centres,
        "removed": removed,
    }


def test_a_loaded_index_finds_added_entries_and_not_removed_ones(chain) -> None:  # type: ignore[no-untyped-def]
    index, data = chain
    assert index.disk is not None and len(index.disk.extra) == len(data["added"])
    assert len(index) == len(data["ids"]) - data["removed"].size + len(data["added"])
    # Added entries: found as their own best match, scored from their float16 rows.
    hits = index.search(data["added"], 1, -1.0)
    assert [h[0].id for h in hits] == data["added_ids"].tolist()
    assert min(h[0].score for h in hits) > 0.999
    half = data["added"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(index.reconstruct(data["added_ids"][::-1]), half[::-1])
    # Removed entries: gone from every answer, their clusters' queries included.
    removed = set(data["removed"].tolist())
    for found in _hit_ids(index, data["centres"][:50], CLUSTER):
        assert not found & removed
    with pytest.raises(KeyError):
        index.reconstruct(data["removed"][:1])
    with pytest.raises(RowFileError, match="in RAM only"):
        index.serialize()


def test_compaction_streams_the_chain_into_an_index_that_answers_alike(  # type: ignore[no-untyped-def]
    chain, tmp_path: Path
) -> None:
    index, data = chain
    kept = np.setdiff1d(data["ids"], data["removed"])
    compacted = streamed_index(
        index, tmp_path / "v3" / "v3.rows", kept, data["added_ids"], data["added"]
    )
    assert compacted.disk is not None and not len(compacted.disk.extra)
    assert compacted.params == index.params
    np.testing.assert_array_equal(compacted.ids(), index.ids())
    queries = np.concatenate([data["centres"][50:], data["added_centres"]])
    # The same trained lists and float16 rows: the chain applied in place answers the same.
    assert compacted.search(queries, CLUSTER, -1.0) == index.search(queries, CLUSTER, -1.0)
    # A from-scratch build of the same entries (retrained) finds the same ids.
    keep = ~np.isin(data["ids"], data["removed"])
    scratch = CosineIndex.build(
        np.concatenate([data["ids"][keep], data["added_ids"]]),
        np.concatenate([data["vectors"][keep], data["added"]]),
        algorithm="ivf_disk",
        nlist=16,
        nprobe=16,
        row_dir=tmp_path / "scratch",
    )
    found = _hit_ids(compacted, queries, CLUSTER)
    assert found == _hit_ids(scratch, queries, CLUSTER)
    members = np.concatenate([data["ids"][50 * CLUSTER :], data["added_ids"]])
    assert found == [set(c.tolist()) for c in members.reshape(-1, CLUSTER)]
    # The streamed version loads from its own row file like any full version.
    again = load_index(compacted.serialize(), authenticated=True, row_dir=tmp_path / "v3")
    assert isinstance(again, CosineIndex)
    assert again.search(queries, CLUSTER, -1.0) == compacted.search(queries, CLUSTER, -1.0)
