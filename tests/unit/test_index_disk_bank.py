"""A bank imported through the normal path, with the size thresholds lowered, is served by an
``ivf_disk`` index and keeps its region embeddings in an encrypted row file: both files lie
beside the snapshot, are pruned with it, and screening still finds the match."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import moderation.banks.flag_delta as flag_delta
import moderation.banks.index.cosine as cosine_module
import moderation.banks.versions as versions
from moderation.banks.delta_chain import snapshot_path
from moderation.banks.operations import delete_entries, import_bank, set_entry_disabled
from moderation.banks.records import create_bank
from moderation.banks.retention import prune_snapshots
from moderation.banks.rowfile import RowArray, RowFileError
from moderation.banks.snapshot import SnapshotError
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import current_snapshot, read_payload
from moderation.matching.classifier.features import RegionLookup
from moderation.matching.classifier.regions import make_region_embedder
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from tests.conftest import force_compaction, skimage_photo

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")


def _jpeg(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)  # type: ignore[attr-defined]
    return buffer.getvalue()


@pytest.fixture
def disk_rt(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A runtime where 4 active entries count as a bank past one machine's memory."""
    monkeypatch.setattr(versions, "STORED_INDEX_MIN_ENTRIES", 4)
    monkeypatch.setattr(versions, "REGION_FILE_MIN_ROWS", 1)
    for name in ("HNSW_MIN_ENTRIES", "PCA_MIN_ENTRIES", "DISK_MIN_ENTRIES"):
        monkeypatch.setattr(cosine_module, name, 4)
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    yield runtime


def _payload(rt: Runtime) -> tuple[Payload, Path]:
    with rt.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        path = rt.settings.snapshots_dir / Path(row.path).name
        return read_payload(session, rt.keyring, rt.settings.snapshots_dir, row), path


def test_a_large_bank_is_served_from_disk_end_to_end(
    disk_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for name in PHOTOS:
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(_jpeg(skimage_photo(name)))
    embedder = make_region_embedder(disk_rt.encoder, disk_rt.settings.batch_size)
    computed: list[np.ndarray] = []  # the float32 region embeddings, in import order

    def recording(images: list[Image.Image]) -> list[np.ndarray]:
        computed.extend(embedder(images))
        return computed[-len(images) :]

    import_bank(disk_rt, "known-bad", paths, actor="test", region_embedder=recording)

    payload, snapshot = _payload(disk_rt)
    rows_file = snapshot.with_suffix(".rows")
    regions_file = snapshot.with_suffix(".regions")
    assert rows_file.exists() and regions_file.exists()
    assert isinstance(payload.region_vectors, RowArray) and len(payload.region_vectors) > 0
    blocklist = disk_rt.load_blocklist()
    assert blocklist.cosine.algorithm == "ivf_disk" and len(blocklist.cosine) == len(PHOTOS)
    assert blocklist.cosine.row_path == rows_file

    # Region embeddings: float16 rows, the float32 originals within rounding.
    lookup = RegionLookup(blocklist)
    by_label = {info.label: eid for eid, info in blocklist.entries.items()}
    for name, expected in zip(PHOTOS, computed, strict=True):
        windows = lookup(by_label[name])
        assert windows.shape == expected.shape and windows.dtype == np.float32
        np.testing.assert_allclose(windows, expected, atol=1e-3)
        np.testing.assert_array_equal(blocklist.regions_of(by_label[name]), windows)

    # Screening through the worker's screener finds the entry.
    chelsea = skimage_photo("chelsea")
    screener = disk_rt.screener()
    copy, unrelated = screener.screen_bytes(
        [_jpeg(ImageOps.mirror(chelsea)), _jpeg(skimage_photo("hubble_deep_field"))]
    )
    assert copy.decision in ("block", "review"), copy.explanation
    assert copy.matches[0].entry.label == "chelsea"
    assert unrelated.decision == "allow", unrelated.explanation

    # The next full version writes new row files and prunes the old ones with their snapshot
    # (a flag change of one entry would be a delta: more than 5% of the entries flip here).
    monkeypatch.setattr(flag_delta, "FLAG_DELTA_MIN_ENTRIES", 0)
    set_entry_disabled(disk_rt, f"e_{by_label['rocket']}", disabled=True, actor="test")
    _, second_snapshot = _payload(disk_rt)
    assert second_snapshot != snapshot and second_snapshot.with_suffix(".rows").exists()
    assert not rows_file.exists() and not regions_file.exists() and not snapshot.exists()
    again = disk_rt.load_blocklist()
    assert again.cosine.algorithm == "ivf_disk" and by_label["rocket"] not in again.cosine
    np.testing.assert_array_equal(
        RegionLookup(again)(by_label["chelsea"]), lookup(by_label["chelsea"])
    )


def test_a_missing_or_replaced_row_file_fails_closed(disk_rt: Runtime, tmp_path: Path) -> None:
    paths = []
    for name in PHOTOS:
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(_jpeg(skimage_photo(name)))
    import_bank(disk_rt, "known-bad", paths, actor="test")
    _, snapshot = _payload(disk_rt)
    rows_file = snapshot.with_suffix(".rows")
    saved = rows_file.read_bytes()
    rows_file.unlink()
    with pytest.raises(SnapshotError, match="cannot open"):
        disk_rt.load_blocklist()
    # Tampered after load: the query that reads the row fails with a clear error.
    rows_file.write_bytes(saved)
    blocklist = disk_rt.load_blocklist()
    raw = bytearray(saved)
    raw[-5] ^= 0x01  # the last row's tag
    rows_file.write_bytes(bytes(raw))
    last = int(np.argmax(blocklist.cosine.ids()))
    with pytest.raises(RowFileError, match="fails authentication"):
        blocklist.cosine.reconstruct(blocklist.cosine.ids())
    assert last in blocklist.cosine


def test_a_row_file_chain_takes_deltas_applied_in_place(
    disk_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding to and removing from a bank served by ``ivf_disk`` writes delta versions; a
    worker applies them in place (added rows in RAM beside the row file, region rows from the
    delta), a fresh load of the chain answers the same, and a tampered delta is refused."""
    paths = []
    for name in (*PHOTOS, "coins"):
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(_jpeg(skimage_photo(name)))
    import_bank(disk_rt, "known-bad", paths[:-1], actor="test")
    with disk_rt.sessions() as session:
        first = current_snapshot(session)
        assert first is not None and versions.keeps_row_files(disk_rt.settings.snapshots_dir, first)
    state = WorkerState(disk_rt, poll_interval=60)
    state.refresh()
    screener = state.screener()
    blocklist, cosine = screener.blocklist, screener.blocklist.cosine
    assert cosine.algorithm == "ivf_disk" and len(cosine) == len(PHOTOS)
    coins_jpeg = _jpeg(skimage_photo("coins"))
    assert screener.screen_bytes([coins_jpeg])[0].decision == "allow"

    embedder = make_region_embedder(disk_rt.encoder, disk_rt.settings.batch_size)
    computed: list[np.ndarray] = []

    def recording(images: list[Image.Image]) -> list[np.ndarray]:
        computed.extend(embedder(images))
        return computed[-len(images) :]

    import_bank(disk_rt, "known-bad", paths[-1:], actor="test", region_embedder=recording)
    with disk_rt.sessions() as session:
        second = current_snapshot(session)
        assert second is not None and second.base_version == first.version
    full_reload = disk_rt.load_blocklist

    def no_full_reload(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker reloaded the whole bank")

    monkeypatch.setattr(disk_rt, "load_blocklist", no_full_reload)
    state.refresh()
    assert state.version == second.version and state.error is None
    assert screener.blocklist is blocklist and blocklist.cosine is cosine
    assert len(cosine) == len(PHOTOS) + 1 and cosine.disk is not None
    assert len(cosine.disk.extra) == 1  # the added row, in RAM; the row file is unchanged
    (coins,) = screener.screen_bytes([coins_jpeg])
    assert coins.decision == "block", coins.explanation
    coins_id = coins.matches[0].entry.entry_id
    assert coins.matches[0].entry.label == "coins" and coins.index_version == second.version
    assert len(computed) == 1 and len(computed[0])
    np.testing.assert_allclose(RegionLookup(blocklist)(coins_id), computed[0], atol=1e-6)

    by_label = {info.label: eid for eid, info in blocklist.entries.items()}
    delete_entries(disk_rt, [by_label["chelsea"]], actor="test")
    state.refresh()
    assert screener.blocklist is blocklist and by_label["chelsea"] not in cosine
    (chelsea,) = screener.screen_bytes([_jpeg(ImageOps.mirror(skimage_photo("chelsea")))])
    assert all(m.entry.label != "chelsea" for m in chelsea.matches)

    # A fresh load of the chain (full ivf_disk version + both deltas) answers the same.
    fresh = full_reload()
    assert fresh.version == blocklist.version and fresh.cosine.algorithm == "ivf_disk"
    np.testing.assert_array_equal(fresh.cosine.ids(), cosine.ids())
    queries = np.stack([blocklist.vector_of(int(eid)) for eid in cosine.ids()])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert fresh.cosine.search(queries, 3, -1.0) == cosine.search(queries, 3, -1.0)
    np.testing.assert_array_equal(fresh.regions_of(coins_id), blocklist.regions_of(coins_id))

    # A tampered delta is refused: by a fresh load and by a worker catching up.
    with disk_rt.sessions() as session:
        head = current_snapshot(session)
        assert head is not None
        path = snapshot_path(disk_rt.settings.snapshots_dir, head)
    saved = path.read_bytes()
    data = bytearray(saved)
    data[-40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        full_reload()
    monkeypatch.setattr(disk_rt, "load_blocklist", full_reload)
    late = WorkerState(disk_rt, poll_interval=60)
    late.refresh()
    assert late.version is None and late.error is not None and "SHA-256" in late.error
    path.write_bytes(saved)

    # Compaction streams the chain into a new full version with its own row files, reusing
    # the trained index: it answers as the chain applied in place does.
    compacted = force_compaction(disk_rt)
    assert compacted.compacted_from == head.version
    assert versions.keeps_row_files(disk_rt.settings.snapshots_dir, compacted)
    with transaction(disk_rt.sessions) as session:
        prune_snapshots(session, disk_rt.settings.snapshots_dir)
    assert not path.exists() and not snapshot_path(disk_rt.settings.snapshots_dir, first).exists()
    # A worker at the chain's head reloads (it held the pruned version's row files open).
    state.refresh()
    assert state.version == compacted.version and state.error is None
    whole = state.screener().blocklist
    assert whole is not blocklist and whole.cosine.row_path is not None
    assert whole.cosine.row_path.exists() and whole.cosine.row_path != cosine.row_path
    assert whole.cosine.disk is not None and not len(whole.cosine.disk.extra)
    np.testing.assert_array_equal(whole.cosine.ids(), cosine.ids())
    assert whole.cosine.search(queries, 3, -1.0) == cosine.search(queries, 3, -1.0)
    assert isinstance(whole.payload.region_vectors, RowArray)
    # The delta kept the added entry's rows in float32; the row files keep float16.
    regions = whole.regions_of(coins_id)
    np.testing.assert_allclose(regions, blocklist.regions_of(coins_id), atol=1e-3)
    assert regions.shape == computed[0].shape
    for eid in cosine.ids().tolist():
        np.testing.assert_allclose(whole.vector_of(eid), blocklist.vector_of(eid), atol=1e-3)
        assert whole.pdq_of(eid) == blocklist.pdq_of(eid)
