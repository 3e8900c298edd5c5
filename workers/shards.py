"""The shard search task: a shard worker's answer to one screening's cosine search (issue 16
item 3, :mod:`moderation.banks.shards`).

``moderation worker --shard i`` consumes queue ``shard-i`` only; each of its processes holds
shard ``i`` of the current snapshot (:class:`~moderation.service.shard_worker.ShardState`),
loaded right after fork and kept current by a watcher thread.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import signals

from moderation.banks.shards import ShardUnavailable, decode_queries
from moderation.service.shard_worker import ShardState
from workers.celery_app import SHARD_TASK, SHARD_TIME_LIMIT, get_app
from workers.tasks import consumed_queues, runtime

logger = logging.getLogger(__name__)

app = get_app()
_state: ShardState | None = None
_held: int | None = None  # set in the main process before fork: the shard queue it consumes
_SHARD_QUEUE = re.compile(r"shard-(\d+)")


def shard_state(shard: int) -> ShardState:
    """This process's shard (loaded on first use).

    Raises:
        ShardUnavailable: this process already holds another shard (a misrouted request).
    """
    global _state
    if _state is None:
        rt = runtime()
        _state = ShardState(rt, shard, poll_interval=rt.settings.snapshot_poll_interval)
        _state.refresh()
        _state.start_watcher()
    if _state.shard != shard:
        raise ShardUnavailable(f"this worker holds shard {_state.shard}, not {shard}")
    return _state


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _record_shard(sender: Any = None, **_: Any) -> None:
    global _held
    consumed = consumed_queues(sender) or []
    held = [int(m.group(1)) for name in consumed if (m := _SHARD_QUEUE.fullmatch(name))]
    _held = held[0] if len(held) == 1 else None


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_shard(**_: Any) -> None:
    if _held is not None:
        shard_state(_held)


@app.task(  # type: ignore[untyped-decorator]
    name=SHARD_TASK,
    ignore_result=False,
    acks_late=False,
    time_limit=SHARD_TIME_LIMIT,
    soft_time_limit=SHARD_TIME_LIMIT - 5,
)
def shard_search(
    shard: int, snapshot_id: str | None, queries: dict[str, Any], k: int, threshold: float
) -> dict[str, Any]:
    """Search this worker's shard for the screening worker's ``queries`` (float32 ``(q, d)``,
    :func:`~moderation.banks.shards.encode_queries`); the answer names the snapshot searched.
    Acknowledged on receipt: a search lost with its worker is not redone, its sender retries."""
    answer = shard_state(shard).answer(snapshot_id, decode_queries(queries), k, threshold)
    return answer.to_json()
