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

import moderation.banks.index.cosine as cosine_module
import moderation.banks.versions as versions
from moderation.banks.operations import import_bank, set_entry_disabled
from moderation.banks.records import create_bank
from moderation.banks.rowfile import RowArray, RowFileError
from moderation.banks.snapshot import SnapshotError
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import current_snapshot, read_payload
from moderation.matching.classifier.features import RegionLookup
from moderation.matching.classifier.regions import make_region_embedder
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from tests.conftest import skimage_photo

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


def test_a_large_bank_is_served_from_disk_end_to_end(disk_rt: Runtime, tmp_path: Path) -> None:
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

    # The next version writes new row files and prunes the old ones with their snapshot.
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


def test_a_row_file_chain_takes_full_versions_not_deltas(disk_rt: Runtime, tmp_path: Path) -> None:
    """Adding to a bank served by ``ivf_disk`` writes a full version (a loaded ``ivf_disk``
    index refuses additions), and a reloaded worker finds the added entry."""
    paths = []
    for name in (*PHOTOS, "coins"):
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(_jpeg(skimage_photo(name)))
    import_bank(disk_rt, "known-bad", paths[:-1], actor="test")
    with disk_rt.sessions() as session:
        first = current_snapshot(session)
        assert first is not None and versions.keeps_row_files(disk_rt.settings.snapshots_dir, first)
    import_bank(disk_rt, "known-bad", paths[-1:], actor="test")
    with disk_rt.sessions() as session:
        second = current_snapshot(session)
        assert second is not None and second.version > first.version
        assert second.base_version is None  # a full version, not a delta on ``first``
    blocklist = disk_rt.load_blocklist()
    assert blocklist.cosine.algorithm == "ivf_disk" and len(blocklist.cosine) == len(paths)
    (coins,) = disk_rt.screener().screen_bytes([_jpeg(skimage_photo("coins"))])
    assert coins.decision == "block", coins.explanation
