"""Sharded screening at the library level, without a broker (issue 16 item 3): two
:class:`ShardState` load their halves of a real bank, a screening worker's blocklist searches
them (an in-process fan-out in place of Celery's), and a missing shard gives the attempt back."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank
from moderation.banks.shard_index import ShardedCosineIndex
from moderation.banks.shards import ShardAnswer, ShardUnavailable, shard_of_ids
from moderation.config import Settings
from moderation.service.api_clients import create_api_client
from moderation.service.dispatch import RecordingDispatcher
from moderation.service.queue import Outcome, RetryLater, process_upload
from moderation.service.runtime import Runtime
from moderation.service.shard_worker import ShardState
from moderation.service.submission import submit_upload
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.models import Upload
from tests.conftest import migrated_runtime, skimage_photo

BANNED = ("astronaut", "chelsea", "coffee", "rocket")


def jpeg(name: str, size: int = 256) -> bytes:
    image = skimage_photo(name)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def rt(settings: Settings, tmp_path: Path) -> Iterator[Runtime]:
    """A runtime with index_shards=2 and a four-entry bank."""
    with migrated_runtime(settings.model_copy(update={"index_shards": 2})) as runtime:
        bank_dir = tmp_path / "bank"
        bank_dir.mkdir()
        for name in BANNED:
            (bank_dir / f"{name}.jpg").write_bytes(jpeg(name))
        with transaction(runtime.sessions) as session:
            create_bank(session, "known-bad")
        import_bank(runtime, "known-bad", [bank_dir], actor="test")
        yield runtime


class InProcess:
    """A ShardSearch calling the shards' states directly; ``down`` shards do not answer."""

    def __init__(self, states: list[ShardState]) -> None:
        self.states = states
        self.shards = len(states)
        self.down: set[int] = set()

    def __call__(
        self, queries: npt.NDArray[np.float32], k: int, threshold: float, snapshot_id: str | None
    ) -> list[ShardAnswer]:
        answers = [
            s.answer(snapshot_id, queries, k, threshold)
            for s in self.states
            if s.shard not in self.down
        ]
        if len(answers) < self.shards:
            raise ShardUnavailable(f"shard(s) {sorted(self.down)} did not answer within 0.1 s")
        return answers


def entry_shards(rt: Runtime) -> dict[str, int]:
    """Entry label (the photo's name) -> shard of its entry."""
    entries = rt.load_blocklist().entries
    shards = shard_of_ids(np.asarray(list(entries)), 2)
    return {info.label: int(s) for info, s in zip(entries.values(), shards, strict=True)}


def submit(rt: Runtime, data: bytes, external_id: str) -> str:
    with transaction(rt.sessions) as session:
        client = create_api_client(session, rt.keyring, f"client-{external_id}")
    return submit_upload(
        rt,
        RecordingDispatcher(),
        data=data,
        external_id=external_id,
        subject_id="user-1",
        client_id=client.client_id,
    ).upload_id


def test_shards_hold_halves_and_screening_merges_them(rt: Runtime) -> None:
    states = [ShardState(rt, shard, poll_interval=60) for shard in (0, 1)]
    for state in states:
        state.refresh()
    owners = entry_shards(rt)
    assert set(owners.values()) == {0, 1}, owners  # the bank spans both shards
    loaded = [state.current for state in states]
    assert all(s is not None and s.version == 1 for s in loaded)
    assert sum(len(s) for s in loaded if s is not None) == len(BANNED)
    for state in states:
        assert state.current is not None and len(state.current) == sum(
            1 for shard in owners.values() if shard == state.shard
        )

    fan_out = InProcess(states)
    rt.shard_search = fan_out
    worker = WorkerState(rt, poll_interval=60)
    assert isinstance(worker.screener().blocklist.cosine, ShardedCosineIndex)
    for name in BANNED:  # banned photos of both shards are blocked
        done = process_upload(
            rt, submit(rt, jpeg(name, 200), name), worker.screener, max_attempts=3
        )
        assert (done.outcome, done.decision) == (Outcome.DECIDED, "block"), name
    other = process_upload(
        rt, submit(rt, jpeg("motorcycle_left", 200), "m"), worker.screener, max_attempts=3
    )
    assert other.decision == "allow"

    # One shard down: the upload is not decided, its attempt is given back.
    fan_out.down = {1}
    upload_id = submit(rt, jpeg("hubble_deep_field", 200), "h")
    with pytest.raises(RetryLater, match="shards unavailable"):
        process_upload(rt, upload_id, worker.screener, max_attempts=3)
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None and (upload.status, upload.attempts) == ("queued", 0)
    fan_out.down = set()
    assert process_upload(rt, upload_id, worker.screener, max_attempts=3).decision == "allow"


def test_a_new_version_is_picked_up_and_stale_answers_refused(rt: Runtime, tmp_path: Path) -> None:
    states = [ShardState(rt, shard, poll_interval=60) for shard in (0, 1)]
    for state in states:
        state.refresh()
    more = tmp_path / "more"
    more.mkdir()
    (more / "motorcycle_left.jpg").write_bytes(jpeg("motorcycle_left"))
    import_bank(rt, "known-bad", [more], actor="test")
    rt.shard_search = InProcess(states)
    blocklist = rt.load_blocklist()  # v2, while the shards still hold v1
    queries = blocklist.cosine.reconstruct(np.asarray(list(blocklist.entries)[:1]))
    with pytest.raises(ShardUnavailable, match="on v1; this worker screens with v2"):
        blocklist.cosine.search(queries, 5, 0.5)
    for state in states:
        state.refresh()
    assert [s.current.version for s in states if s.current] == [2, 2]
    assert blocklist.cosine.search(queries, 5, 0.5)[0][0].score > 0.99


def test_shard_numbers_are_checked(rt: Runtime, settings: Settings) -> None:
    with pytest.raises(ValueError, match="shard 2 does not exist"):
        ShardState(rt, 2, poll_interval=1)
    with migrated_runtime(settings) as unsharded, pytest.raises(ValueError, match="index_shards=1"):
        ShardState(unsharded, 0, poll_interval=1)


def test_a_delta_applied_in_place_is_screened_by_the_shards(rt: Runtime, tmp_path: Path) -> None:
    """A screening worker that applies a delta in place (no full reload) asks the shards for
    the new version: before, it kept asking for the loaded one, every shard answer was refused
    as stale and uploads were retried until a full reload."""
    states = [ShardState(rt, shard, poll_interval=60) for shard in (0, 1)]
    for state in states:
        state.refresh()
    rt.shard_search = InProcess(states)
    worker = WorkerState(rt, poll_interval=60)
    screener = worker.screener()
    assert screener.blocklist.version == 1
    more = tmp_path / "more"
    more.mkdir()
    (more / "motorcycle_left.jpg").write_bytes(jpeg("motorcycle_left"))
    rt.shard_search = None  # the importing process (`moderation bank import`) is no worker
    import_bank(rt, "known-bad", [more], actor="test")  # written as a delta, v2
    for state in states:
        state.refresh()
    worker.refresh()
    assert worker.screener() is screener  # caught up in place, not reloaded
    assert screener.blocklist.version == 2
    assert isinstance(screener.blocklist.cosine, ShardedCosineIndex)
    done = process_upload(
        rt, submit(rt, jpeg("motorcycle_left", 200), "m2"), worker.screener, max_attempts=3
    )
    assert (done.outcome, done.decision) == (Outcome.DECIDED, "block")
