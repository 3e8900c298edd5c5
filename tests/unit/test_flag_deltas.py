"""Flag changes as delta versions (issue 16): disabling or re-enabling an entry writes a delta
whose tombstones and segment are the flipped entry; a running worker applies it in place, a
fresh load of the chain equals it, and compaction keeps a disabled entry's vector so that it
can be re-enabled. The same on a chain served by ``ivf_disk``, without decoding every vector."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import moderation.banks.flag_delta as flag_delta
from moderation.banks.blocklist import Blocklist
from moderation.banks.delta_chain import read_delta
from moderation.banks.hash_import import import_hash_list
from moderation.banks.operations import import_bank, set_entry_disabled
from moderation.banks.snapshot_payload import Payload
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.signals.exact import EXACT_KINDS
from moderation.storage.models import IndexSnapshot
from tests.conftest import force_compaction, skimage_photo
from tests.unit.test_hash_import import MD5_A, PDQ_A
from tests.unit.test_index_disk_bank import PHOTOS, disk_rt  # noqa: F401 (fixture)
from tests.unit.test_snapshot_deltas import _add, _by_id, _head, _payload, rt  # noqa: F401


def _jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    skimage_photo(name).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _no_full_reload(*args: object, **kwargs: object) -> None:
    raise AssertionError("the worker reloaded the whole bank")


def _flip(runtime: Runtime, state: WorkerState, entry_id: int, *, disabled: bool) -> IndexSnapshot:
    """Flip one entry; check the delta written and that the worker caught up in place."""
    blocklist = state.screener().blocklist
    set_entry_disabled(runtime, f"e_{entry_id}", disabled=disabled, actor="test")
    head = _head(runtime)
    assert head.base_version is not None, "a flag change on a short chain is a delta"
    delta = read_delta(
        runtime.keyring, runtime.settings.snapshots_dir, head, base_version=head.base_version
    )
    assert delta.tombstones.tolist() == [entry_id]
    assert delta.segment.entry_ids.tolist() == [entry_id]
    assert delta.segment.active.tolist() == [not disabled]
    state.refresh()
    assert state.error is None and state.version == head.version
    assert state.screener().blocklist is blocklist
    assert (entry_id in blocklist.cosine) is (not disabled)
    return head


def _matches(state: WorkerState, name: str) -> bool:
    (result,) = state.screener().screen_bytes([_jpeg(name)])
    return any(m.entry.label == name for m in result.matches)


def _same_as_fresh(blocklist: Blocklist, load: Callable[[], Blocklist]) -> None:
    fresh = load()
    assert fresh.version == blocklist.version
    assert sorted(fresh.entries) == sorted(blocklist.entries)
    np.testing.assert_array_equal(np.sort(fresh.cosine.ids()), np.sort(blocklist.cosine.ids()))
    queries = np.stack([blocklist.vector_of(int(eid)) for eid in blocklist.cosine.ids()])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert fresh.cosine.search(queries, 3, -1.0) == blocklist.cosine.search(queries, 3, -1.0)


def _labels(state: WorkerState) -> dict[str, int]:
    return {info.label: eid for eid, info in state.screener().blocklist.entries.items()}


def test_disable_and_enable_write_deltas_applied_in_place(
    rt: Runtime,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _add(rt, "coffee")  # coffee's signals live in a delta segment, the others in the full one
    state = WorkerState(rt, poll_interval=60)
    state.refresh()
    ids = _labels(state)
    before = _by_id(_payload(rt, _head(rt)))
    full_reload = rt.load_blocklist
    monkeypatch.setattr(rt, "load_blocklist", _no_full_reload)
    assert _matches(state, "chelsea") and _matches(state, "coffee")

    _flip(rt, state, ids["chelsea"], disabled=True)
    assert not _matches(state, "chelsea") and _matches(state, "coffee")
    _same_as_fresh(state.screener().blocklist, full_reload)
    _flip(rt, state, ids["coffee"], disabled=True)
    assert not _matches(state, "coffee")
    head = _flip(rt, state, ids["chelsea"], disabled=False)
    assert _matches(state, "chelsea") and not _matches(state, "coffee")
    _same_as_fresh(state.screener().blocklist, full_reload)
    composed = _by_id(_payload(rt, head))
    assert {eid: v[:2] for eid, v in composed.items()} == {eid: v[:2] for eid, v in before.items()}
    assert not composed[ids["coffee"]][2] and composed[ids["chelsea"]][2]

    # Compaction keeps the disabled entry's vector; re-enabling it afterwards matches again.
    full = force_compaction(rt)
    assert _by_id(_payload(rt, full)) == composed
    state.refresh()
    assert state.version == full.version
    _flip(rt, state, ids["coffee"], disabled=False)
    assert _matches(state, "coffee") and _matches(state, "chelsea")
    _same_as_fresh(state.screener().blocklist, full_reload)


def test_too_many_flipped_entries_write_a_full_version(
    rt: Runtime,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flag_delta, "FLAG_DELTA_MIN_ENTRIES", 0)  # 1 of 2 is past 5%
    _add(rt, "coffee")
    first = min(_by_id(_payload(rt, _head(rt))))
    set_entry_disabled(rt, f"e_{first}", disabled=True, actor="test")
    head = _head(rt)
    assert head.base_version is None
    assert not _by_id(_payload(rt, head))[first][2]


def test_an_ivf_disk_chain_takes_flag_deltas_without_decoding_every_vector(
    disk_rt: Runtime,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = []
    for name in PHOTOS:
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(_jpeg(name))
        paths.append(path)
    import_bank(disk_rt, "known-bad", paths[:-1], actor="test")
    import_bank(disk_rt, "known-bad", paths[-1:], actor="test")  # rocket: in a delta
    state = WorkerState(disk_rt, poll_interval=60)
    state.refresh()
    assert state.screener().blocklist.cosine.algorithm == "ivf_disk"
    ids = _labels(state)

    full_vectors = Payload.full_vectors

    def no_full_decode(self: Payload) -> np.ndarray:
        # A payload holding its vectors (a delta's segment) returns them; one keeping them in
        # its stored index would decode every row of the row file.
        assert not self.vectors_in_index, "every vector of the bank was decoded"
        return full_vectors(self)

    monkeypatch.setattr(Payload, "full_vectors", no_full_decode)
    full_reload = disk_rt.load_blocklist
    monkeypatch.setattr(disk_rt, "load_blocklist", _no_full_reload)
    assert _matches(state, "chelsea") and _matches(state, "rocket")
    _flip(disk_rt, state, ids["chelsea"], disabled=True)  # its row from the row file
    _flip(disk_rt, state, ids["rocket"], disabled=True)  # its row from the delta segment
    assert not _matches(state, "chelsea") and not _matches(state, "rocket")
    _same_as_fresh(state.screener().blocklist, full_reload)
    _flip(disk_rt, state, ids["chelsea"], disabled=False)  # from the chain's segment again
    assert _matches(state, "chelsea") and _matches(state, "astronaut")

    # The streamed compaction keeps rocket's row as inactive; re-enabling it matches again.
    full = force_compaction(disk_rt)
    monkeypatch.setattr(disk_rt, "load_blocklist", full_reload)
    state.refresh()  # a worker at the chain's head reloads the compacted version
    assert state.version == full.version
    monkeypatch.setattr(disk_rt, "load_blocklist", _no_full_reload)
    assert not _matches(state, "rocket")
    _flip(disk_rt, state, ids["rocket"], disabled=False)  # from the inactive rows
    assert _matches(state, "rocket") and _matches(state, "chelsea")
    _same_as_fresh(state.screener().blocklist, full_reload)


def test_a_hash_list_entry_flag_change_is_a_delta_with_its_exact_hashes(
    rt: Runtime,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"pdq {PDQ_A}\nvideo_md5 {MD5_A}\n", encoding="utf-8")
    import_hash_list(rt, "known-bad", listing, actor="test")
    state = WorkerState(rt, poll_interval=60)
    state.refresh()
    hashes = _payload(rt, _head(rt)).hashes
    md5_row = int(np.flatnonzero(hashes.exact_kinds == EXACT_KINDS.index("md5"))[0])
    md5_id = int(hashes.exact_entry_ids[md5_row])
    keyed = {"md5": hashes.exact_keyed[md5_row].tobytes()}
    blocklist = state.screener().blocklist
    assert blocklist.exact_matches(keyed) == [(md5_id, "md5")]
    full_reload = rt.load_blocklist
    monkeypatch.setattr(rt, "load_blocklist", _no_full_reload)

    set_entry_disabled(rt, f"e_{md5_id}", disabled=True, actor="test")
    head = _head(rt)
    assert head.base_version is not None
    delta = read_delta(rt.keyring, rt.settings.snapshots_dir, head, base_version=head.base_version)
    assert delta.tombstones.tolist() == [md5_id] and not len(delta.segment.entry_ids)
    assert delta.segment.hashes.entry_ids.tolist() == [md5_id]
    assert delta.segment.hashes.active.tolist() == [False]
    assert delta.segment.hashes.exact_entry_ids.tolist() == [md5_id]
    state.refresh()
    assert state.screener().blocklist is blocklist and state.version == head.version
    assert blocklist.exact_matches(keyed) == []
    _same_as_fresh(blocklist, full_reload)

    set_entry_disabled(rt, f"e_{md5_id}", disabled=False, actor="test")
    state.refresh()
    assert state.screener().blocklist is blocklist and _head(rt).base_version is not None
    assert blocklist.exact_matches(keyed) == [(md5_id, "md5")]
    _same_as_fresh(blocklist, full_reload)
    assert full_reload().exact_matches(keyed) == [(md5_id, "md5")]
