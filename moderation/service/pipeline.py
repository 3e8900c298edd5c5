"""The chunk scheduler of :func:`moderation.service.operations.screen_paths`.

Each chunk of files is prepared (read, decoded, hashed, preprocessed: no model needed), then
finished (embedded, searched, decided: the screener), then stored, in that order, and stored in
chunk order. Worker threads, one per core, take whichever task is ready: finishing the oldest
prepared chunk first, else preparing the next one. The calling thread loads the screener (its
imports, the model, the blocklist) while the workers prepare the first chunks, then stores;
the workers may start before that, while the command still imports
(:func:`moderation.service.preparation.preparation`).

An optional ``advance`` step (embedding, for screening) may run on a prepared chunk before the
finisher exists, once ``can_advance`` says it can (the encoder has loaded while the blocklist
and the database still load): the cores then embed instead of idling behind the start-up.

``concurrent`` finishes (and advances) may run at once: 1 for a model that spreads each call
over several threads (one worker embeds while the other prepares), the number of cores for a
model that runs each call on one thread (then both cores embed or prepare, whichever is
ready, so neither idles while the other stage lags, and the last chunks leave a core idle for
at most one chunk's embedding).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Generic, TypeVar

#: Chunks read ahead of the oldest one not yet stored: bounds memory (decoded frames and encoder
#: inputs, about 1.2 MB per photo) while the screener loads, when the first chunks are prepared.
MAX_AHEAD: Final = 8
#: Seconds between a waiting worker's checks of ``can_advance`` (the encoder finishes loading
#: on another thread, which does not wake the workers).
ADVANCE_POLL_S: Final = 0.01


def usable_cores() -> int:
    """Processors this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


Chunk = TypeVar("Chunk")
Ready = TypeVar("Ready")
Finisher = TypeVar("Finisher")
Done = TypeVar("Done")


class Pipeline(Generic[Chunk, Ready, Finisher, Done]):
    """Runs ``prepare``, then ``finish`` (with the loaded finisher), of each chunk on
    ``workers`` threads, at most ``concurrent`` finishes at once and :data:`MAX_AHEAD` chunks
    ahead of the ones :meth:`run` has handed to ``store``. Before the finisher is loaded,
    prepared chunks go through ``advance`` (oldest first, counted among the ``concurrent``
    calls) whenever ``can_advance()`` holds; ``finish`` gets each chunk advanced or not.

    :meth:`start` may come early (the workers prepare while the caller still imports and sets
    up); :meth:`run` starts them if need be. :meth:`close` stops them (also when :meth:`run`
    was never called); both it and :meth:`run` end with the workers stopped.

    Args:
        chunks: the work, in order.
        prepare: a chunk -> what ``finish`` takes (thread-safe).
        workers: worker threads (at least 1).
        concurrent: finishes allowed at once (at least 1).
        advance: optional step on a prepared chunk before the finisher is loaded
            (thread-safe; a failure is raised by :meth:`run` like a failed ``prepare``).
        can_advance: whether ``advance`` may start now (polled every
            :data:`ADVANCE_POLL_S` while workers wait).
    """

    def __init__(
        self,
        chunks: Sequence[Chunk],
        prepare: Callable[[Chunk], Ready],
        *,
        workers: int,
        concurrent: int,
        advance: Callable[[Ready], Ready] | None = None,
        can_advance: Callable[[], bool] = lambda: True,
    ) -> None:
        self.chunks = chunks
        self.prepare = prepare
        self.advance = advance
        self.can_advance = can_advance
        self._advanced: set[int] = set()
        self.workers = max(1, workers)
        self.concurrent = max(1, concurrent)
        self._cond = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._finish: Callable[[Ready], Done] | None = None
        self._stop = False
        self._next_prepare = 0  # next chunk to prepare
        self._next_finish = 0  # next chunk to finish
        self._stored = 0  # chunks handed to store
        self._finishing = 0
        self._prepared: dict[int, Future[Ready]] = {}
        self._done: list[Future[Done]] = [Future() for _ in chunks]

    def start(self) -> None:
        """Start the workers (once): they prepare the first chunks."""
        with self._cond:
            if self._pool is not None or self._stop:
                return
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="screen")
            for _ in range(self.workers):
                self._pool.submit(self._work)

    def close(self) -> None:
        """Stop the workers once their current task is done, and wait for them."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True)

    def run(
        self,
        load: Callable[[], Finisher],
        finish: Callable[[Finisher, Ready], Done],
        store: Callable[[Chunk, Done], None],
    ) -> None:
        """``load`` the finisher on this thread (the workers prepare meanwhile), ``finish``
        each prepared chunk with it on the workers, ``store`` each chunk's result here, in
        order. The first exception (of ``load``, a task or ``store``) stops the workers and is
        raised once they have stopped.

        Raises:
            RuntimeError: the pipeline was closed before.
        """
        if self._stop:
            raise RuntimeError("the pipeline is closed")
        self.start()
        try:
            finisher = load()
            with self._cond:
                self._finish = lambda ready: finish(finisher, ready)
                self._cond.notify_all()
            for index, chunk in enumerate(self.chunks):
                result = self._done[index].result()
                store(chunk, result)
                with self._cond:
                    self._stored = index + 1
                    self._cond.notify_all()
        finally:
            self.close()

    def _work(self) -> None:
        """Worker loop: take the next task, run it outside the lock, until none is left."""
        while True:
            with self._cond:
                task = self._take()
                while task is None and not self._stop and self._next_finish < len(self.chunks):
                    polling = self.advance is not None and self._finish is None
                    self._cond.wait(ADVANCE_POLL_S if polling else None)
                    task = self._take()
            if task is None:
                return
            task()

    def _take(self) -> Callable[[], None] | None:
        """The next task (lock held): finishing the oldest prepared chunk, else preparing the
        next one; None when neither may start now."""
        if self._stop:
            return None
        index = self._next_finish
        ready = self._prepared.get(index)
        finish = self._finish
        if (
            finish is not None
            and ready is not None
            and ready.done()
            and self._finishing < self.concurrent
        ):
            self._next_finish += 1
            self._finishing += 1
            del self._prepared[index]
            return lambda: self._finish_one(index, finish, ready)
        advance = self._take_advance() if finish is None else None
        if advance is not None:
            return advance
        index = self._next_prepare
        if index < len(self.chunks) and index < self._stored + MAX_AHEAD:
            self._next_prepare += 1
            future: Future[Ready] = Future()
            self._prepared[index] = future
            return lambda: self._prepare_one(index, future)
        return None

    def _take_advance(self) -> Callable[[], None] | None:
        """Advancing the oldest prepared chunk not yet advanced (lock held), or None."""
        if self.advance is None or self._finishing >= self.concurrent:
            return None
        waiting = [
            index
            for index, future in self._prepared.items()
            if index not in self._advanced and future.done() and future.exception() is None
        ]
        if not waiting or not self.can_advance():
            return None
        index = min(waiting)
        prepared = self._prepared[index]
        advanced: Future[Ready] = Future()
        self._prepared[index] = advanced
        self._advanced.add(index)
        self._finishing += 1
        return lambda: self._advance_one(prepared, advanced)

    def _advance_one(self, prepared: Future[Ready], advanced: Future[Ready]) -> None:
        assert self.advance is not None
        try:
            advanced.set_result(self.advance(prepared.result()))
        except BaseException as exc:  # handed to the finish step, raised by run()
            advanced.set_exception(exc)
        with self._cond:
            self._finishing -= 1
            self._cond.notify_all()

    def _prepare_one(self, index: int, future: Future[Ready]) -> None:
        try:
            future.set_result(self.prepare(self.chunks[index]))
        except BaseException as exc:  # handed to the finish step, raised by run()
            future.set_exception(exc)
        with self._cond:
            self._cond.notify_all()

    def _finish_one(
        self, index: int, finish: Callable[[Ready], Done], ready: Future[Ready]
    ) -> None:
        done = self._done[index]
        try:
            done.set_result(finish(ready.result()))
        except BaseException as exc:  # raised by run() in the calling thread
            done.set_exception(exc)
        with self._cond:
            self._finishing -= 1
            self._cond.notify_all()
