"""The ``ivf_disk`` cosine index: candidates in RAM, float16 rows in an encrypted row file read
per query (:mod:`moderation.banks.index.disk`, :mod:`moderation.banks.rowfile`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import moderation.banks.index.cosine as cosine_module
from moderation.banks.index import CosineIndex, load_index
from moderation.banks.index.disk import ROWS_SUFFIX
from moderation.banks.rowfile import (
    HEADER_BYTES,
    TAG_BYTES,
    RowArray,
    RowFile,
    RowFileDescriptor,
    RowFileError,
)
from moderation.banks.versions import ROWS_SUFFIX as VERSIONS_ROWS_SUFFIX

DIM = 512
Built = tuple[CosineIndex, npt.NDArray[np.int64], npt.NDArray[np.float32]]


def _unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """``n`` unit vectors around n/20 centres: near-duplicates, as in a bank."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(1, n // 20), DIM)).astype(np.float32))
    picks = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (0.5 / np.sqrt(DIM))
    return _unit(centres[picks] + noise)


def _queries(vectors: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(7)
    picked = vectors[rng.choice(len(vectors), count, replace=False)]
    return _unit(picked + rng.standard_normal(picked.shape).astype(np.float32) * 0.01)


@pytest.fixture
def built(tmp_path: Path) -> Built:
    vectors = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64) * 5 + 11
    index = CosineIndex.build(ids, vectors, algorithm="ivf_disk", nlist=32, row_dir=tmp_path)
    return index, ids, vectors


def test_suffix_matches_the_snapshot_pruning() -> None:
    assert ROWS_SUFFIX == VERSIONS_ROWS_SUFFIX


def test_build_add_remove_search_and_reconstruct(built: Built, tmp_path: Path) -> None:
    index, ids, vectors = built
    assert index.algorithm == "ivf_disk" and len(index) == 3000
    assert index.params == {
        "algorithm": "ivf_disk",
        "nlist": 32,
        "nprobe": 32,
        "pca_dim": 256,
        "k_factor": 32,
    }
    assert index.row_path is not None and index.row_path.parent == tmp_path
    # The row file holds ciphertext: no float16 row appears in it.
    raw = index.row_path.read_bytes()
    assert len(raw) == HEADER_BYTES + 3000 * (DIM * 2 + TAG_BYTES)
    assert vectors[0].astype("<f2").tobytes()[:64] not in raw
    # Rows come back as float16 widened: within rounding, and still unit-norm.
    back = index.reconstruct(ids[[5, 0, 2999]])
    np.testing.assert_allclose(back, vectors[[5, 0, 2999]], atol=1e-3)
    (hits,) = index.search(vectors[7][None], 3, 0.0)
    assert hits[0].id == int(ids[7]) and abs(hits[0].score - 1.0) < 1e-3
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    extra = _clustered(50, seed=3)
    index.add(np.arange(50, dtype=np.int64) + 100_000, extra)
    assert len(index) == 3050 and 100_049 in index
    (hits,) = index.search(extra[49][None], 1, 0.9)
    assert hits[0].id == 100_049
    with pytest.raises(ValueError, match="already"):
        index.add([100_000], extra[:1])

    assert index.remove([int(ids[7]), 123_456_789]) == 1
    assert int(ids[7]) not in index and len(index) == 3049
    (hits,) = index.search(vectors[7][None], 10, -1.0)
    assert int(ids[7]) not in [h.id for h in hits] and len(hits) == 10
    with pytest.raises(KeyError):
        index.reconstruct([int(ids[7])])


def test_serialize_round_trip_opens_the_same_rows(built: Built, tmp_path: Path) -> None:
    index, ids, vectors = built
    index.remove([int(ids[1])])
    data = bytearray(index.serialize())
    queries = _queries(vectors, 20)
    expected = index.search(queries, 10, -1.0)

    loaded = load_index(data, authenticated=True, row_dir=tmp_path)
    assert isinstance(loaded, CosineIndex)
    assert loaded.params == index.params and len(loaded) == len(index)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    assert loaded.search(queries, 10, -1.0) == expected
    np.testing.assert_array_equal(loaded.reconstruct(ids[2:6]), index.reconstruct(ids[2:6]))
    # A loaded index may drop entries; its row file is read-only (it belongs to the snapshot):
    # added rows stay in RAM, and such an index is not serialized again.
    assert loaded.remove([int(ids[2])]) == 1 and int(ids[2]) not in loaded
    rows_before = (tmp_path / loaded.row_path.name).stat().st_size if loaded.row_path else 0
    loaded.add([999_999], vectors[:1])
    assert loaded.disk is not None and len(loaded.disk.extra) == 1
    assert loaded.row_path is not None and loaded.row_path.stat().st_size == rows_before
    with pytest.raises(RowFileError, match="in RAM only"):
        loaded.serialize()

    # Without its row directory it loads but cannot search, and says why.
    unopened = load_index(bytes(data))
    assert isinstance(unopened, CosineIndex)
    with pytest.raises(RowFileError, match="row_dir"):
        unopened.search(queries[:1], 1, 0.0)


def test_recall_against_exact_search(tmp_path: Path) -> None:
    vectors = _clustered(4000, seed=1)
    ids = np.arange(4000, dtype=np.int64)
    index = CosineIndex.build(ids, vectors, algorithm="ivf_disk", nlist=64, row_dir=tmp_path)
    queries = _queries(vectors, 100)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = index.search(queries, 10, -1.0)
    recall = np.mean(
        [len({h.id for h in hits} & set(row)) / 10 for hits, row in zip(found, exact, strict=True)]
    )
    assert recall >= 0.95, recall
    # Scores are full-width cosines (float16 rows): within 1e-3 of the exact ones.
    for hits, query in zip(found, queries, strict=True):
        exact_scores = vectors[[h.id for h in hits]] @ query
        np.testing.assert_allclose([h.score for h in hits], exact_scores, atol=1e-3)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_tampered_row_is_refused(built: Built, tmp_path: Path) -> None:
    index, ids, vectors = built
    data = index.serialize()
    assert index.row_path is not None
    block = DIM * 2 + TAG_BYTES
    _flip(index.row_path, HEADER_BYTES + 7 * block + 100)
    loaded = load_index(data, row_dir=tmp_path)  # only the header is checked at load
    assert isinstance(loaded, CosineIndex)
    with pytest.raises(RowFileError, match="row 7 fails authentication"):
        loaded.search(vectors[7][None], 1, 0.0)
    with pytest.raises(RowFileError, match="row 7"):
        loaded.reconstruct([int(ids[7])])
    np.testing.assert_allclose(loaded.reconstruct([int(ids[8])]), vectors[[8]], atol=1e-3)


def test_wrong_key_or_another_file_is_refused(built: Built, tmp_path: Path) -> None:
    index, _, _ = built
    assert index.row_path is not None
    good = RowFileDescriptor.from_bytes(index._disk.sections()["rows"])  # type: ignore[union-attr]
    wrong_key = RowFileDescriptor(good.name, good.file_id, bytes(32), good.rows)
    with pytest.raises(RowFileError, match="fails authentication"):
        RowFile.open(tmp_path, wrong_key, DIM).read([0])
    # Another version's row file (another id) put in its place: refused at open.
    other = RowFile.create(tmp_path / "other.rows", DIM)
    other.append(_clustered(good.rows))
    (tmp_path / "other.rows").replace(index.row_path)
    with pytest.raises(RowFileError, match="not the row file"):
        RowFile.open(tmp_path, good, DIM)
    # Truncated: refused at open.
    short = RowFile.create(tmp_path / "short.rows", DIM)
    short.append(_clustered(3))
    cut = RowFileDescriptor("short.rows", short.descriptor().file_id, short.descriptor().key, 4)
    with pytest.raises(RowFileError, match="truncated"):
        RowFile.open(tmp_path, cut, DIM)
    with pytest.raises(RowFileError, match="cannot open"):
        RowFile.open(tmp_path, RowFileDescriptor("gone.rows", good.file_id, good.key, 1), DIM)


def test_row_array_indexes_like_numpy(tmp_path: Path) -> None:
    rows = _clustered(40, seed=5)
    file = RowFile.create(tmp_path / "r.rows", DIM)
    file.append(rows[:25])
    file.append(rows[25:])
    array = RowArray(RowFile.open(tmp_path, file.descriptor(), DIM))
    half = rows.astype(np.float16).astype(np.float32)
    assert array.shape == (40, DIM) and len(array) == 40
    np.testing.assert_array_equal(array[3], half[3])
    np.testing.assert_array_equal(array[-1], half[-1])
    np.testing.assert_array_equal(array[5:30], half[5:30])
    np.testing.assert_array_equal(array[1:9:3], half[1:9:3])
    picks = np.array([30, 2, 2, 17])
    np.testing.assert_array_equal(array[picks], half[picks])
    mask = np.arange(40) % 3 == 0
    np.testing.assert_array_equal(array[mask], half[mask])
    np.testing.assert_array_equal(np.asarray(array), half)
    with pytest.raises(IndexError):
        array[np.ones(3, bool)]


def test_auto_chooses_disk_only_with_a_row_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HNSW_MIN_ENTRIES", "PCA_MIN_ENTRIES"):
        monkeypatch.setattr(cosine_module, name, 100)
    monkeypatch.setattr(cosine_module, "DISK_MIN_ENTRIES", 200)
    vectors = _clustered(300, seed=9)
    ids = np.arange(300)
    assert CosineIndex.build(ids[:150], vectors[:150], row_dir=tmp_path).algorithm == "ivf_pca"
    assert CosineIndex.build(ids, vectors).algorithm == "ivf_pca"
    chosen = CosineIndex.build(ids, vectors, row_dir=tmp_path, row_name="bank.rows")
    assert chosen.algorithm == "ivf_disk" and chosen.row_path == tmp_path / "bank.rows"
    with pytest.raises(RowFileError, match="cannot create"):  # never over an existing file
        CosineIndex.build(ids, vectors, row_dir=tmp_path, row_name="bank.rows")
