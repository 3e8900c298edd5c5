"""How many rows an ``ivf_disk`` query reads: the ``k x rerank_factor`` best of its SQ8
candidates by estimated cosine (:data:`~moderation.banks.index.disk.RERANK_FACTOR`,
:data:`~moderation.banks.index.disk.RESIDUAL_WEIGHT`), not all ``k x k_factor``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from moderation.banks.index import CosineIndex, load_index
from moderation.banks.index.disk import RERANK_FACTOR, DiskIvf
from moderation.banks.rowfile import HEADER_BYTES, TAG_BYTES, RowFile, RowFileError
from tests.unit.test_index_disk import DIM, _clustered, _queries


class CountingReads:
    """Wraps ``RowFile.read`` and records how many rows each call asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        original = RowFile.read

        def read(rows: RowFile, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            self.calls.append(len(positions))
            return original(rows, positions)

        monkeypatch.setattr(RowFile, "read", read)


def _build(tmp_path: Path) -> tuple[CosineIndex, DiskIvf, npt.NDArray[np.float32]]:
    vectors = _clustered(4000, seed=1)
    index = CosineIndex.build(
        np.arange(4000), vectors, algorithm="ivf_disk", nlist=64, row_dir=tmp_path
    )
    assert index.disk is not None
    return index, index.disk, vectors


def test_a_query_reads_k_times_rerank_factor_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, disk, vectors = _build(tmp_path)
    queries = _queries(vectors, 60)
    reads = CountingReads(monkeypatch)
    found = index.search(queries, 10, -1.0)
    assert reads.calls == [10 * RERANK_FACTOR] * 60

    # Reading every candidate (the previous behaviour) finds the same neighbours: the rows
    # left unread are ones whose estimate says they cannot reach the top 10.
    reads.calls.clear()
    disk.rerank_factor = disk.k_factor
    everything = index.search(queries, 10, -1.0)
    assert reads.calls == [10 * disk.k_factor] * 60
    same = [
        len({h.id for h in a} & {h.id for h in b}) / 10
        for a, b in zip(found, everything, strict=True)
    ]
    assert np.mean(same) >= 0.99, np.mean(same)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean(
        [len({h.id for h in hits} & set(row)) / 10 for hits, row in zip(found, exact, strict=True)]
    )
    assert recall >= 0.95, recall

    # A factor above k_factor reads no more than the candidates; k=1 reads rerank_factor rows.
    disk.rerank_factor = 10 * disk.k_factor
    reads.calls.clear()
    index.search(queries[:2], 3, -1.0)
    assert reads.calls == [3 * disk.k_factor] * 2
    disk.rerank_factor = RERANK_FACTOR
    reads.calls.clear()
    (hits,) = index.search(vectors[9][None], 1, 0.0)
    assert reads.calls == [RERANK_FACTOR] and hits[0].id == 9


def test_estimates_bound_the_cosine_from_above_with_full_weight(tmp_path: Path) -> None:
    _, disk, vectors = _build(tmp_path)
    queries = _queries(vectors, 30)
    disk.residual_weight = 1.0
    bound, positions = disk.candidates(queries, 50, 16)
    disk.residual_weight = 0.0
    sq8, same = disk.candidates(queries, 50, 16)
    np.testing.assert_array_equal(positions, same)
    found = positions >= 0
    assert found.all()
    exact = np.einsum("qd,qcd->qc", queries, vectors[disk.labels[positions]])
    # <q, x> = <Pq, Px> + <q_r, x_r> <= <Pq, Px> + |q_r||x_r| (Cauchy-Schwarz), up to the
    # 8-bit codes' error. The SQ8 score alone ranks the query's near-duplicate low by
    # <q_r, x_r> (its residual points the query's way), which the estimate adds back.
    assert (exact <= bound + 5e-3).all(), float((exact - bound).max())
    nearest = np.argmax(exact, axis=1)[:, None]
    under = np.take_along_axis(exact - sq8, nearest, axis=1)
    assert (under > 0.02).all(), float(under.min())
    assert (bound >= sq8).all()


def test_only_the_rows_read_are_authenticated(tmp_path: Path) -> None:
    index, disk, vectors = _build(tmp_path)
    data = index.serialize()
    query = vectors[7][None]
    expected = index.search(query, 10, -1.0)
    estimate, positions = disk.candidates(query, 10 * disk.k_factor, int(index.params["nprobe"]))
    last = int(positions[0][np.argmin(estimate[0])])  # the candidate least likely to matter
    assert index.row_path is not None
    raw = bytearray(index.row_path.read_bytes())
    raw[HEADER_BYTES + last * (DIM * 2 + TAG_BYTES) + 50] ^= 0x01
    index.row_path.write_bytes(bytes(raw))
    loaded = load_index(data, row_dir=tmp_path)
    assert isinstance(loaded, CosineIndex) and loaded.disk is not None
    assert loaded.search(query, 10, -1.0) == expected  # its row is not read
    loaded.disk.rerank_factor = loaded.disk.k_factor
    with pytest.raises(RowFileError, match=f"row {last} fails authentication"):
        loaded.search(query, 10, -1.0)
