"""Large banks carry their built cosine index in the encrypted snapshot (algorithm and
parameters in its header); workers load it instead of rebuilding, and fall back to building
when it does not hold exactly the loaded entries. Small banks and older snapshots have none."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import moderation.banks.blocklist as blocklist_module
import moderation.banks.flag_delta as flag_delta
import moderation.banks.index.cosine as cosine_module
import moderation.banks.index.cosine_params as cosine_params
import moderation.banks.versions as versions
from moderation.banks.index import CosineIndex, load_index
from moderation.banks.operations import import_bank, set_entry_disabled
from moderation.banks.records import create_bank
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import current_snapshot, read_payload
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction
from tests.conftest import skimage_photo

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")


def _write(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.jpg"
    buffer = io.BytesIO()
    skimage_photo(name).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def large_rt(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """A runtime where 4 active entries count as a large bank (stored HNSW index)."""
    monkeypatch.setattr(versions, "STORED_INDEX_MIN_ENTRIES", 4)
    monkeypatch.setattr(cosine_module, "HNSW_MIN_ENTRIES", 4)
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    yield runtime


def _payload(rt: Runtime) -> Payload:
    with rt.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        return read_payload(session, rt.keyring, rt.settings.snapshots_dir, row)


def test_small_bank_snapshot_has_no_stored_index(runtime: Runtime, tmp_path: Path) -> None:
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    import_bank(runtime, "known-bad", [_write(tmp_path, "coffee")], actor="test")
    assert _payload(runtime).cosine_index is None
    assert runtime.load_blocklist().cosine.algorithm == "flat"


def test_large_bank_snapshot_round_trips_its_index(
    large_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_bank(large_rt, "known-bad", [_write(tmp_path, n) for n in PHOTOS], actor="test")
    payload = _payload(large_rt)
    assert payload.cosine_index is not None
    stored = load_index(payload.cosine_index)
    assert isinstance(stored, CosineIndex)
    assert stored.params["algorithm"] == "hnsw"
    assert stored.params["ef_search"] == cosine_params.HNSW_EF_SEARCH
    assert sorted(stored.ids().tolist()) == sorted(payload.entry_ids.tolist())

    # Loading uses the stored index: building is not called.
    def no_build(*args: object, **kwargs: object) -> CosineIndex:
        raise AssertionError("the stored index should have been used")

    monkeypatch.setattr(CosineIndex, "build", no_build)
    blocklist = large_rt.load_blocklist()
    assert blocklist.cosine.params == stored.params
    vector = blocklist.vector_of(int(payload.entry_ids[2]))
    (hits,) = blocklist.cosine.search(vector[None, :], 1, 0.99)
    assert hits[0].id == int(payload.entry_ids[2])


def test_stored_index_is_rewritten_when_entries_change(
    large_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flag_delta, "FLAG_DELTA_MIN_ENTRIES", 0)  # flags in full versions
    import_bank(large_rt, "known-bad", [_write(tmp_path, n) for n in PHOTOS], actor="test")
    first = _payload(large_rt)
    victim = int(first.entry_ids[0])
    set_entry_disabled(large_rt, f"e_{victim}", disabled=True, actor="test")
    second = _payload(large_rt)
    assert second.cosine_index is not None and second.cosine_index != first.cosine_index
    assert victim not in load_index(second.cosine_index)
    assert victim not in large_rt.load_blocklist().cosine
    set_entry_disabled(large_rt, f"e_{victim}", disabled=False, actor="test")
    assert victim in large_rt.load_blocklist().cosine


def test_a_stored_index_that_disagrees_is_rebuilt(large_rt: Runtime, tmp_path: Path) -> None:
    import_bank(large_rt, "known-bad", [_write(tmp_path, n) for n in PHOTOS], actor="test")
    payload = _payload(large_rt)
    vectors = payload.full_vectors()  # decoded from the stored index before it is replaced
    assert not payload.vectors_in_index and vectors.shape == (len(PHOTOS), payload.dim)
    active = payload.entry_ids[payload.active]
    partial = CosineIndex.build(active[:2], vectors[payload.active][:2])
    payload.cosine_index = partial.serialize()
    mask = payload.active.copy()
    rebuilt = blocklist_module._cosine_index(payload, active, mask)
    assert sorted(rebuilt.ids().tolist()) == sorted(active.tolist())
    # Round trip of a payload with and without the optional array.
    again = Payload.from_bytes(payload.to_bytes())
    assert again.cosine_index == payload.cosine_index and not again.vectors_in_index
    payload.cosine_index = None
    assert Payload.from_bytes(payload.to_bytes()).cosine_index is None
    np.testing.assert_array_equal(again.vectors, payload.vectors)
    with pytest.raises(ValueError, match="needs a stored index"):
        payload.to_bytes(index_holds_active=True)


@pytest.mark.parametrize("flags_in_full", [True, False])
@pytest.mark.parametrize("algorithm", ["hnsw", "ivf_pca"])
def test_active_vectors_are_kept_once_in_the_stored_index(
    large_rt: Runtime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    algorithm: str,
    flags_in_full: bool,
) -> None:
    if algorithm == "ivf_pca":  # the large-bank index, float16 codes
        monkeypatch.setattr(cosine_module, "PCA_MIN_ENTRIES", 4)
    import_bank(large_rt, "known-bad", [_write(tmp_path, n) for n in PHOTOS], actor="test")
    payload = _payload(large_rt)
    assert payload.vectors_in_index and payload.vectors.shape == (0, payload.dim)
    blocklist = large_rt.load_blocklist()
    assert blocklist.cosine.algorithm == algorithm
    ids = [int(e) for e in payload.entry_ids]
    before = {eid: blocklist.vector_of(eid) for eid in ids}
    for vector in before.values():
        assert vector.shape == (payload.dim,) and vector.dtype == np.float32
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
    # The compact payload is smaller by the active rows and reads back the same vectors.
    full = Payload.from_bytes(payload.to_bytes())
    full.full_vectors()
    assert len(full.to_bytes()) - len(payload.to_bytes()) == len(ids) * payload.dim * 4
    np.testing.assert_array_equal(full.vectors, np.stack([before[eid] for eid in ids]))

    # Disabled, as a full version (one flipped entry of five is past 5%) or as a delta: in
    # full its row moves out of the index into ``vectors``; as a delta the segment re-adds the
    # row read from the stored index. Either way versions do not drift.
    if flags_in_full:
        monkeypatch.setattr(flag_delta, "FLAG_DELTA_MIN_ENTRIES", 0)
    victim = ids[1]
    set_entry_disabled(large_rt, f"e_{victim}", disabled=True, actor="test")
    second = _payload(large_rt)
    assert (second.cosine_index is not None) is flags_in_full
    if flags_in_full:
        assert second.vectors_in_index and second.vectors.shape == (1, payload.dim)
    row = second.entry_ids.tolist().index(victim)
    assert not second.active[row]
    np.testing.assert_array_equal(second.full_vectors()[row], before[victim])
    after = large_rt.load_blocklist()
    assert victim not in after.cosine
    for eid in ids:
        np.testing.assert_array_equal(after.vector_of(eid), before[eid])
    set_entry_disabled(large_rt, f"e_{victim}", disabled=False, actor="test")
    third = large_rt.load_blocklist()
    assert victim in third.cosine
    for eid in ids:
        np.testing.assert_array_equal(third.vector_of(eid), before[eid])
    with pytest.raises(KeyError):
        third.vector_of(10**9)
