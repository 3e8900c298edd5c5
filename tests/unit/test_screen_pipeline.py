"""The chunk scheduler of ``screen_paths`` (moderation.service.pipeline): order, limits, errors."""

from __future__ import annotations

import threading
import time

import pytest

from moderation.service import pipeline as pipeline_module
from moderation.service.pipeline import Pipeline


class Probe:
    """Counts the finishes running at once and the chunks prepared ahead of the stored ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.prepared: list[int] = []
        self.stored: list[int] = []
        self.most_ahead = 0

    def prepare(self, chunk: int) -> int:
        with self.lock:
            self.prepared.append(chunk)
            self.most_ahead = max(self.most_ahead, len(self.prepared) - len(self.stored))
        time.sleep(0.002)
        return chunk * 10

    def finish(self, finisher: str, ready: int) -> tuple[str, int]:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(0.01 if ready % 20 else 0.03)  # uneven: later chunks may finish first
        with self.lock:
            self.running -= 1
        return finisher, ready + 1

    def store(self, chunk: int, done: tuple[str, int]) -> None:
        assert done == ("screener", chunk * 10 + 1)
        self.stored.append(chunk)


@pytest.mark.parametrize("concurrent", [1, 2, 3])
def test_every_chunk_is_stored_in_order_within_the_limits(concurrent: int) -> None:
    probe = Probe()
    chunks = list(range(23))
    run = Pipeline(chunks, probe.prepare, workers=3, concurrent=concurrent)
    run.run(lambda: "screener", probe.finish, probe.store)
    assert probe.stored == chunks
    assert sorted(probe.prepared) == chunks
    assert probe.most_running <= concurrent
    assert probe.most_ahead <= pipeline_module.MAX_AHEAD


def test_chunks_are_prepared_while_the_finisher_loads() -> None:
    probe = Probe()
    run = Pipeline(list(range(20)), probe.prepare, workers=2, concurrent=2)
    run.start()

    def load() -> str:
        deadline = time.monotonic() + 10
        while len(probe.prepared) < pipeline_module.MAX_AHEAD and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # no more than MAX_AHEAD are taken before anything is stored
        assert len(probe.prepared) == pipeline_module.MAX_AHEAD
        return "screener"

    run.run(load, probe.finish, probe.store)
    assert probe.stored == list(range(20))


def test_the_first_error_stops_the_workers_and_is_raised() -> None:
    probe = Probe()

    def finish(finisher: str, ready: int) -> tuple[str, int]:
        if ready == 30:
            raise RuntimeError("chunk 3 failed")
        return probe.finish(finisher, ready)

    run = Pipeline(list(range(40)), probe.prepare, workers=2, concurrent=2)
    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        run.run(lambda: "screener", finish, probe.store)
    assert probe.stored == [0, 1, 2]
    assert len(probe.prepared) < 40  # stopped early
    with pytest.raises(RuntimeError, match="closed"):
        run.run(lambda: "screener", finish, probe.store)


def test_a_failing_load_or_a_close_without_run_stops_the_workers() -> None:
    probe = Probe()
    run = Pipeline(list(range(40)), probe.prepare, workers=2, concurrent=1)

    def load() -> str:
        raise ValueError("no blocklist")

    with pytest.raises(ValueError, match="no blocklist"):
        run.run(load, probe.finish, probe.store)
    assert probe.stored == [] and len(probe.prepared) <= pipeline_module.MAX_AHEAD
    idle = Pipeline(list(range(40)), probe.prepare, workers=2, concurrent=1)
    idle.start()
    idle.close()  # returns: its workers, waiting for a finisher, have stopped
    assert not any(t.name.startswith("screen") and t.is_alive() for t in threading.enumerate())


def test_prepared_chunks_are_advanced_while_the_finisher_loads() -> None:
    """Once ``can_advance`` holds, prepared chunks go through ``advance`` (oldest first, no more
    than ``concurrent`` at once) before the finisher exists; ``finish`` gets them advanced,
    and chunks prepared after the load are finished without it."""
    probe = Probe()
    ready = threading.Event()
    advanced: list[int] = []
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def advance(value: int) -> int:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            advanced.append(value // 10)
        time.sleep(0.005)
        with lock:
            running["now"] -= 1
        return value + 1000

    def finish(finisher: str, value: int) -> tuple[str, int]:
        chunk = (value % 1000) // 10
        assert (value >= 1000) == (chunk in advanced)
        return finisher, chunk * 10 + 1

    run = Pipeline(
        list(range(20)),
        probe.prepare,
        workers=3,
        concurrent=2,
        advance=advance,
        can_advance=ready.is_set,
    )
    run.start()

    def load() -> str:
        deadline = time.monotonic() + 10
        while len(probe.prepared) < pipeline_module.MAX_AHEAD and time.monotonic() < deadline:
            time.sleep(0.005)
        assert advanced == []  # not before can_advance holds
        ready.set()  # the encoder has loaded: the waiting workers notice by polling
        while len(advanced) < pipeline_module.MAX_AHEAD and time.monotonic() < deadline:
            time.sleep(0.005)
        return "screener"

    run.run(load, finish, probe.store)
    assert probe.stored == list(range(20))
    # The chunks prepared before the load, and none after it (the finisher embeds those).
    assert sorted(advanced) == list(range(pipeline_module.MAX_AHEAD))
    assert running["most"] <= 2


def test_a_failing_advance_is_raised_by_run() -> None:
    probe = Probe()

    def advance(value: int) -> int:
        raise RuntimeError("the encoder failed")

    run = Pipeline(list(range(4)), probe.prepare, workers=2, concurrent=1, advance=advance)
    run.start()

    def load() -> str:
        deadline = time.monotonic() + 10
        while len(probe.prepared) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        return "screener"

    with pytest.raises(RuntimeError, match="the encoder failed"):
        run.run(load, probe.finish, probe.store)
    assert probe.stored == []
