"""Delta snapshot versions (issue 16 item 2): a change that adds or removes entries writes a
delta (segment plus tombstones) sealed like a full snapshot; workers apply it in place; a
missing, altered or out-of-order delta is refused; compaction writes the chain as one full
version; key rotation re-wraps deltas too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

import moderation.banks.flag_delta as flag_delta
from moderation.banks.blocklist import catch_up
from moderation.banks.compaction import (
    CompactionRule,
    compact_chains,
    compact_snapshots,
    compaction_due,
)
from moderation.banks.delta_chain import read_delta, snapshot_path
from moderation.banks.operations import delete_entries, import_bank, set_entry_disabled
from moderation.banks.records import create_bank
from moderation.banks.retention import prune_snapshots
from moderation.banks.snapshot import SnapshotError, write_snapshot
from moderation.banks.snapshot_delta import DeltaPayload, compose, without_embeddings
from moderation.banks.snapshot_payload import Payload
from moderation.banks.versions import current_snapshot, read_payload
from moderation.governance.keys import rotate_keys
from moderation.service.runtime import Runtime
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.models import Entry, IndexSnapshot
from tests.conftest import skimage_photo_path

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")


@pytest.fixture
def rt(runtime: Runtime) -> Runtime:
    """A runtime with bank ``known-bad`` holding astronaut and chelsea (full version v1)."""
    with transaction(runtime.sessions) as session:
        create_bank(session, "known-bad")
    _add(runtime, "astronaut", "chelsea")
    return runtime


def _add(rt: Runtime, *names: str) -> int:
    paths = [skimage_photo_path(name) for name in names]
    import_bank(rt, "known-bad", paths, actor="test")
    return _head(rt).version


def _head(rt: Runtime) -> IndexSnapshot:
    with rt.sessions() as session:
        row = current_snapshot(session)
        assert row is not None
        session.expunge(row)
        return row


def _rows(rt: Runtime) -> list[IndexSnapshot]:
    with rt.sessions() as session:
        rows = list(session.scalars(select(IndexSnapshot).order_by(IndexSnapshot.version)))
        for row in rows:
            session.expunge(row)
        return rows


def _payload(rt: Runtime, row: IndexSnapshot) -> Payload:
    with rt.sessions() as session:
        return read_payload(session, rt.keyring, rt.settings.snapshots_dir, row)


def _by_id(payload: Payload) -> dict[int, tuple[bytes, bytes, bool]]:
    vectors = payload.full_vectors()
    return {
        int(eid): (vectors[i].tobytes(), payload.pdq[i].tobytes(), bool(payload.active[i]))
        for i, eid in enumerate(payload.entry_ids)
    }


def _corrupt(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_adding_entries_writes_a_delta_that_round_trips(rt: Runtime) -> None:
    full = _head(rt)
    assert full.base_version is None
    before = _payload(rt, full)
    version = _add(rt, "coffee")
    head = _head(rt)
    assert head.version == version and head.base_version == full.version
    assert head.changed_entries == 1
    # The delta file holds only the new entry's signals, not the bank.
    assert head.size_bytes < full.size_bytes
    delta = read_delta(rt.keyring, rt.settings.snapshots_dir, head, base_version=full.version)
    assert delta.segment.entry_ids.tolist() == [max(_by_id(before)) + 1]
    assert delta.segment.active.tolist() == [True] and not len(delta.tombstones)
    composed = _payload(rt, head)
    assert set(_by_id(composed)) == set(_by_id(before)) | set(delta.segment.entry_ids.tolist())
    assert _by_id(composed)[int(delta.segment.entry_ids[0])][0] == (
        delta.segment.vectors[0].tobytes()
    )
    # The payload bytes round trip, and a delta is never read as a full payload.
    again = DeltaPayload.from_bytes(delta.to_bytes())
    assert again.base_version == full.version
    np.testing.assert_array_equal(again.segment.vectors, delta.segment.vectors)
    with pytest.raises(ValueError, match="delta"):
        Payload.from_bytes(delta.to_bytes())
    with pytest.raises(ValueError, match="not a delta"):
        DeltaPayload.from_bytes(before.to_bytes())


def test_removing_entries_writes_tombstones(rt: Runtime) -> None:
    _add(rt, "coffee")
    with rt.sessions() as session:
        first = session.scalar(select(Entry.id).order_by(Entry.id))
    assert first is not None
    delete_entries(rt, [first], actor="test")
    head = _head(rt)
    assert head.base_version is not None
    delta = read_delta(rt.keyring, rt.settings.snapshots_dir, head, base_version=head.base_version)
    assert delta.tombstones.tolist() == [first] and not len(delta.segment.entry_ids)
    assert first not in _by_id(_payload(rt, head))
    blocklist = rt.load_blocklist()
    assert first not in blocklist.cosine and first not in blocklist.entries
    assert len(blocklist) == 2


def test_a_tampered_delta_is_refused_and_the_worker_fails_closed(rt: Runtime) -> None:
    state = WorkerState(rt, poll_interval=60)
    state.refresh()
    assert state.version == _head(rt).version
    _add(rt, "coffee")
    head = _head(rt)
    _corrupt(snapshot_path(rt.settings.snapshots_dir, head))
    with pytest.raises(SnapshotError, match="SHA-256"):
        _payload(rt, head)
    with pytest.raises(SnapshotError):
        rt.load_blocklist()
    state.refresh()
    # The delta is refused, the full reload (full version + the same delta) too: no screener.
    assert state.version is None and state.error is not None and "SHA-256" in state.error


def test_a_delta_out_of_order_is_refused(rt: Runtime) -> None:
    _add(rt, "coffee")
    first_delta = _head(rt)
    assert first_delta.base_version is not None
    _add(rt, "camera")
    second = _head(rt)
    # A delta is only read on top of the version it names, in order.
    with pytest.raises(SnapshotError, match="out of order"):
        read_delta(
            rt.keyring, rt.settings.snapshots_dir, second, base_version=first_delta.base_version
        )
    # An older delta copied over a newer one (its own valid file) is refused.
    newer = snapshot_path(rt.settings.snapshots_dir, second)
    shutil.copyfile(snapshot_path(rt.settings.snapshots_dir, first_delta), newer)
    with pytest.raises(SnapshotError):
        _payload(rt, second)
    # A delta authenticated for another base than its row claims is refused too.
    segment = Payload.empty(second.encoder_id, rt.encoder.dim)
    forged = write_snapshot(
        rt.settings.snapshots_dir,
        DeltaPayload(first_delta.base_version, segment).to_bytes(),
        snapshot_id=second.snapshot_id,
        version=second.version,
        encoder_id=second.encoder_id,
        keyring=rt.keyring,
    )
    with transaction(rt.sessions) as session:
        row = session.get(IndexSnapshot, second.version)
        assert row is not None
        row.sha256, row.path = forged.sha256, forged.path.name
    with pytest.raises(SnapshotError, match="out of order"):
        _payload(rt, _head(rt))


def test_a_worker_applies_a_delta_in_place(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    state = WorkerState(rt, poll_interval=60)
    state.refresh()
    screener = state.screener()
    blocklist, cosine, pdq = screener.blocklist, screener.blocklist.cosine, screener.blocklist.pdq
    assert len(cosine) == 2
    photo = skimage_photo_path("coffee").read_bytes()
    assert screener.screen_bytes([photo])[0].decision == "allow"

    version = _add(rt, "coffee")

    def no_full_reload(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker reloaded the whole bank")

    monkeypatch.setattr(rt, "load_blocklist", no_full_reload)
    state.refresh()
    assert state.version == version and state.error is None
    assert state.screener() is screener and screener.blocklist is blocklist
    assert blocklist.cosine is cosine and blocklist.pdq is pdq and len(cosine) == 3
    result = screener.screen_bytes([photo])[0]
    assert result.decision == "block" and result.index_version == version
    added = result.matches[0].entry.entry_id
    assert blocklist.pdq_of(added) == _payload_pdq(rt, added)

    # Removal applies in place as well.
    delete_entries(rt, [added], actor="test")
    state.refresh()
    assert state.screener().blocklist is blocklist and len(cosine) == 2
    assert screener.screen_bytes([photo])[0].decision == "allow"


def _payload_pdq(rt: Runtime, entry_id: int) -> tuple[bytes, int]:
    payload = _payload(rt, _head(rt))
    row = payload.entry_ids.tolist().index(entry_id)
    return payload.pdq[row].tobytes(), int(payload.pdq_quality[row])


def test_catch_up_declines_across_a_full_version(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flag_delta, "FLAG_DELTA_MIN_ENTRIES", 0)  # 1 flipped of 3: in full
    blocklist = rt.load_blocklist()
    _add(rt, "coffee")
    with rt.sessions() as session:
        first = session.scalar(select(Entry.id).order_by(Entry.id))
    set_entry_disabled(rt, f"e_{first}", disabled=True, actor="test")  # written in full
    assert _head(rt).base_version is None
    with rt.sessions() as session:
        assert not catch_up(session, rt.keyring, rt.settings.snapshots_dir, blocklist)


def test_compaction_writes_base_plus_deltas_as_one_full_version(rt: Runtime) -> None:
    state = WorkerState(rt, poll_interval=60)
    state.refresh()
    blocklist = state.screener().blocklist
    _add(rt, "coffee")
    _add(rt, "camera")
    with rt.sessions() as session:
        first = session.scalar(select(Entry.id).order_by(Entry.id))
    assert first is not None
    delete_entries(rt, [first], actor="test")
    head = _head(rt)
    state.refresh()  # the worker follows the deltas in place
    assert state.screener().blocklist is blocklist and state.version == head.version
    chain_payload = _payload(rt, head)
    rule = CompactionRule(after_deltas=3, changed_fraction=10.0)
    with transaction(rt.sessions) as session:
        row = session.get(IndexSnapshot, head.version)
        assert row is not None and compaction_due(session, row, rule)
        assert not compaction_due(session, row, CompactionRule(4, 10.0))
        written = compact_chains(
            session, keyring=rt.keyring, snapshots_dir=rt.settings.snapshots_dir, rule=rule
        )
    assert len(written) == 1
    full = _head(rt)
    assert full.base_version is None and full.compacted_from == head.version
    assert _by_id(_payload(rt, full)) == _by_id(chain_payload)
    assert first not in _by_id(_payload(rt, full))
    with transaction(rt.sessions) as session:
        prune_snapshots(session, rt.settings.snapshots_dir)
    assert [r.version for r in _rows(rt)] == [full.version]
    assert sorted(p.name for p in rt.settings.snapshots_dir.glob("*.snapshot")) == [full.path]
    # The worker at the compacted version only moves its version on.
    state.refresh()
    assert state.screener().blocklist is blocklist and state.version == full.version


def test_old_deltas_are_kept_until_their_base_is_retired(rt: Runtime) -> None:
    base = _head(rt)
    _add(rt, "coffee")
    _add(rt, "camera")
    # Pruning after each change kept the whole chain: full version and both deltas.
    versions = [r.version for r in _rows(rt)]
    assert versions[0] == base.version and len(versions) == 3
    assert all(snapshot_path(rt.settings.snapshots_dir, r).exists() for r in _rows(rt))


def test_compose_applies_tombstones_in_order() -> None:
    def segment(ids: list[int]) -> Payload:
        payload = Payload.empty("enc", 4)
        payload.entry_ids = np.array(ids, np.int64)
        vectors = np.zeros((len(ids), 4), np.float32)
        vectors[:, 0] = 1.0
        payload.vectors = vectors
        payload.pdq = np.full((len(ids), 32), 7, np.uint8)
        payload.pdq_quality = np.full(len(ids), 90, np.uint8)
        payload.active = np.ones(len(ids), np.bool_)
        return payload

    base = segment([1, 2, 3])
    deltas = [
        DeltaPayload(1, segment([4, 5]), np.array([2], np.int64)),
        DeltaPayload(2, segment([6]), np.array([4, 3], np.int64)),
    ]
    assert compose(base, deltas).entry_ids.tolist() == [1, 5, 6]
    # Readers of digests and masks compose without any embedding.
    bare = [
        DeltaPayload(d.base_version, without_embeddings(d.segment), d.tombstones) for d in deltas
    ]
    composed = compose(without_embeddings(base), bare)
    assert composed.entry_ids.tolist() == [1, 5, 6] and composed.vectors.shape == (3, 0)


def test_key_rotation_rewraps_deltas_too(rt: Runtime) -> None:
    _add(rt, "coffee")
    old_keys = {r.key_id for r in _rows(rt)}
    report = rotate_keys(rt, retire_old=True, actor="test")
    rt.reload_keyring()
    rows = _rows(rt)
    assert any(r.base_version is not None for r in rows)
    assert report.rewrapped["snapshots"] == len(rows)
    assert {r.key_id for r in rows} == {report.primary} and report.primary not in old_keys
    blocklist = rt.load_blocklist()
    assert blocklist.version == _head(rt).version and len(blocklist) == 3


def test_the_compaction_job_follows_its_settings_and_erasure_forces_it(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = {"snapshot_compact_after": 2, "snapshot_compact_fraction": 10.0}
    monkeypatch.setattr(rt, "settings", rt.settings.model_copy(update=rule))
    _add(rt, "coffee")
    assert compact_snapshots(rt) == []  # one delta: not due
    _add(rt, "camera")
    (version,) = compact_snapshots(rt)
    assert [r.version for r in _rows(rt)] == [version]
    assert _head(rt).compacted_from == version - 1
    _add(rt, "rocket")
    # Erasure's forced compaction records no compacted_from: workers reload in full.
    (erased,) = compact_snapshots(rt, force=True, erasure=True)
    assert _head(rt).version == erased and _head(rt).compacted_from is None
    assert len(rt.load_blocklist()) == 5
