"""Sharded cosine search end to end (issue 16 item 3): real PostgreSQL and Redis, `moderation
serve`, a screening worker and two shard workers (`moderation worker --shard 0|1`) as real
Celery processes, over a bank whose entries fall in both shards. Banned photos of each shard
are blocked, an unrelated photo allowed; with one shard worker stopped an upload is retried,
never allowed, and it is decided once the shard is back."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import select

from moderation.banks.records import entry_infos
from moderation.banks.shards import shard_of_ids
from moderation.service.platform_client import ModerationClient
from moderation.storage.models import Entry, Upload
from tests.integration.queue_stack import Stack, bank_images, upload_images, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.postgres]


def shard_labels(stack: Stack) -> dict[int, list[str]]:
    """Shard -> labels (photo names) of the bank's entries in it."""
    with stack.runtime.sessions() as session:
        ids = list(session.scalars(select(Entry.id)))
        infos = entry_infos(session, ids, stack.runtime.keyring)
    owners = shard_of_ids(np.asarray(ids), 2)
    out: dict[int, list[str]] = {0: [], 1: []}
    for entry_id, shard in zip(ids, owners.tolist(), strict=True):
        out[shard].append(infos[entry_id].label)
    return out


def upload_state(stack: Stack, upload_id: str) -> tuple[str, int]:
    with stack.runtime.sessions() as session:
        row = session.get(Upload, upload_id)
        assert row is not None
        return row.status, row.attempts


def test_two_shards_block_from_each_and_never_allow_without_one(
    make_pg_stack: Callable[..., Stack],
) -> None:
    stack = make_pg_stack(index_shards=2, shard_search_timeout=3.0, reconcile_after=10)
    stack.init()
    labels = shard_labels(stack)
    assert labels[0] and labels[1], labels  # the bank spans both shards
    client = stack.create_client([])
    stack.start_web()
    shards = [stack.start("shard", "worker", "--shard", str(i)) for i in (0, 1)]
    screening = stack.start_worker()
    stack.start_beat()
    stack.wait_ready()
    api = ModerationClient(stack.base_url, client.token)
    banned = bank_images()

    for shard, names in labels.items():
        for name in names:
            done = api.submit(banned[name], external_id=name, subject_id="u", wait=10)
            if done["status"] != "done":
                done = api.wait(done["id"], timeout=120)
            result = done["result"]
            assert result["decision"] == "block", (shard, name, result)
            assert result["matches"][0]["label"] == name
    other = api.wait(
        api.submit(upload_images(1, seed=3)[0], external_id="o", subject_id="u")["id"],
        timeout=120,
    )
    assert other["result"]["decision"] == "allow"
    assert "did not answer" not in shards[0].output()

    # Shard 1 stops: an upload of one of its banned photos waits, retried, never decided.
    shards[1].stop()
    name = labels[1][0]
    pending = api.submit(banned[name], external_id="while-down", subject_id="u")["id"]
    deadline, seen = time.monotonic() + 25, set()
    while time.monotonic() < deadline:
        status, attempts = upload_state(stack, pending)
        assert status != "done", api.get(pending)
        seen.add(attempts)
        time.sleep(0.5)
    # Each attempt is given back (0 between tries, 1 while one waits on the shards): an outage
    # never adds up to max_attempts (3) and poison.
    assert seen <= {0, 1} and 0 in seen, seen
    assert "shard(s) [1] did not answer within 3 s" in screening.output()

    # Back up: the same upload is screened and blocked.
    stack.start("shard", "worker", "--shard", "1")
    got = wait_until(
        lambda: (r := api.get(pending))["status"] == "done" and r, 180, "the retried upload"
    )
    assert got["result"]["decision"] == "block"
    assert got["result"]["matches"][0]["label"] == name
