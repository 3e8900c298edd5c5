"""A shard worker process's side: its shard of the cosine index, kept current, and its answers.

:class:`ShardState` loads shard ``i`` of the current snapshot (:func:`moderation.banks.
shard_loading.load_shard`) and polls for new versions in a daemon thread, like the screening
worker's :class:`moderation.service.worker.WorkerState`. A request naming a snapshot other than
the loaded one is answered from the loaded one at once (the screening side then retries, see
:func:`moderation.banks.shards.check_answers`) and wakes the poller, so a new version is picked
up without waiting a whole poll interval and no task waits on a load.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from moderation.banks.shard_index import answer_queries
from moderation.banks.shard_loading import ShardIndex, current_snapshot_id, load_shard
from moderation.banks.shards import ShardAnswer, ShardUnavailable
from moderation.banks.snapshot import SnapshotError
from moderation.crypto.errors import CryptoError

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


class ShardState:
    """Shard ``shard`` of the current snapshot in one worker process.

    Args:
        runtime: this process's runtime (its settings give ``index_shards``).
        shard: the shard this worker holds, in ``[0, index_shards)``.
        poll_interval: seconds between checks of the current snapshot version.

    Raises:
        ValueError: ``shard`` out of range, or sharding off (``index_shards`` = 1).
    """

    def __init__(self, runtime: Runtime, shard: int, *, poll_interval: float) -> None:
        shards = runtime.settings.index_shards
        if shards < 2 or not 0 <= shard < shards:
            raise ValueError(f"shard {shard} does not exist with index_shards={shards}")
        self.runtime = runtime
        self.shard, self.shards = shard, shards
        self.poll_interval = poll_interval
        self._current: ShardIndex | None = None
        self._error: str | None = "not loaded yet"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    @property
    def current(self) -> ShardIndex | None:
        """The loaded shard, or None (then :attr:`error` says why)."""
        return self._current

    @property
    def error(self) -> str | None:
        """Why this shard serves nothing (None when it serves)."""
        return self._error

    def refresh(self) -> None:
        """Load the current snapshot's shard when its id differs from the loaded one. Never
        raises: a snapshot that fails to decrypt or verify leaves the shard unloaded (fail
        closed), a database error keeps the loaded shard."""
        with self._lock:
            try:
                with self.runtime.sessions() as session:
                    wanted = current_snapshot_id(session)
                    loaded = self._current
                    if loaded is not None and loaded.snapshot_id == wanted:
                        return
                    self._current = load_shard(
                        session,
                        self.runtime.keyring,
                        self.runtime.settings.snapshots_dir,
                        shard=self.shard,
                        shards=self.shards,
                    )
                    self._error = None
            except (SnapshotError, CryptoError) as exc:
                self._current, self._error = None, str(exc)[:1000]
                logger.error("shard %d serves nothing: %s", self.shard, exc)
            except Exception as exc:  # database down: keep what is loaded
                logger.warning("shard %d: snapshot check failed: %s", self.shard, exc)

    def answer(
        self, snapshot_id: str | None, queries: npt.NDArray[np.float32], k: int, threshold: float
    ) -> ShardAnswer:
        """Search the loaded shard (float32 ``(q, d)`` ``queries``); a request for another
        snapshot wakes the poller and gets the loaded snapshot's answer, which names it.

        Raises:
            ShardUnavailable: no verified snapshot is loaded.
            ValueError: malformed queries, ``k`` or threshold.
        """
        current = self._current
        if current is None:
            self._wake.set()
            raise ShardUnavailable(f"shard {self.shard} has no snapshot: {self._error}")
        if current.snapshot_id != snapshot_id:
            self._wake.set()
        return answer_queries(
            current.index,
            shard=self.shard,
            snapshot_id=current.snapshot_id,
            version=current.version,
            queries=queries,
            k=k,
            threshold=threshold,
        )

    def start_watcher(self) -> None:
        """Poll (or load on request) in a daemon thread."""

        def run() -> None:
            while not self._stop.is_set():
                self._wake.wait(self.poll_interval)
                self._wake.clear()
                self.refresh()

        threading.Thread(target=run, name=f"shard-{self.shard}-watcher", daemon=True).start()

    def stop(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
        self._wake.set()
