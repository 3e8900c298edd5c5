"""A screening worker process's side of the queue: its screener, heartbeat and settings check.

:class:`WorkerState` holds one worker process's screener: the encoder loaded once and the
current snapshot decrypted in memory; it polls the database for a new snapshot version and
swaps the screener between tasks, or applies a delta version to the loaded blocklist in place.
A snapshot that fails to decrypt or verify leaves the worker without a screener: tasks are
retried later, never decided on a wrong or stale blocklist.
:mod:`moderation.service.worker_health` reads the heartbeats back for readiness and refuses
Celery settings that could lose a task.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from moderation.banks.blocklist import catch_up
from moderation.banks.encoder_chains import EncoderChains, encoder_chains
from moderation.banks.records import BlocklistError
from moderation.banks.snapshot import SnapshotError
from moderation.banks.versions import current_snapshot
from moderation.crypto.errors import CryptoError, UnknownKeyError
from moderation.matching.screening import Screener
from moderation.service.queue import SnapshotUnavailable
from moderation.service.shadow import Shadow
from moderation.storage.db import transaction
from moderation.storage.models import WorkerHeartbeat

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)


def worker_id() -> str:
    """``hostname:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerState:
    """One worker process's screener, kept current with the newest snapshot version.

    Args:
        runtime: this process's runtime (build it after fork).
        poll_interval: seconds between checks of the current snapshot version.
    """

    def __init__(self, runtime: Runtime, *, poll_interval: float) -> None:
        self.runtime = runtime
        self.poll_interval = poll_interval
        self.worker_id = worker_id()
        self.started_at = datetime.now(UTC)
        self._lock = threading.Lock()
        self._screener: Screener | None = None
        self._error: str | None = None
        self._loaded_at: datetime | None = None
        self._model: str | None = None
        self._serving: str | None = None  # the serving encoder's name once loaded
        self._shadow: Shadow | None = None
        self._shadow_key: tuple[str, int] | None = None  # (migration id, its chain's version)
        self._checked: float = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> str | None:
        """Why this worker has no screener (None when it has one)."""
        return self._error

    @property
    def version(self) -> int | None:
        """The snapshot version in use, or None."""
        return None if self._screener is None else self._screener.blocklist.version

    def _current_state(self) -> tuple[int, str | None, EncoderChains, int]:
        """(current snapshot version or 0, active classifier model version or None, the
        encoder chains, the shadow chain's newest version or 0)."""
        from moderation.matching.classifier.model import active_model_version

        with self.runtime.sessions() as session:
            chains = encoder_chains(session)
            row = current_snapshot(session)
            shadow = current_snapshot(session, chains.shadow_id) if chains.shadow_id else None
            model = (
                active_model_version(session, str(self.runtime.encoder.id))
                if self.runtime.settings.classifier
                else None
            )
            version = 0 if row is None else row.version
            return version, model, chains, (0 if shadow is None else shadow.version)

    def shadow(self) -> Shadow | None:
        """The encoder migration's target screener while one shadows, else None."""
        return self._shadow

    def refresh(self, *, force: bool = False, wait: bool = True) -> None:
        """Reload the screener when the current snapshot version or the active classifier
        model differs (or after an error), then write this worker's heartbeat. Never raises for
        snapshot problems: they become :attr:`error`. ``wait=False``: return at once when a
        reload is already under way in another thread (the current screener goes on)."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._refresh(force)
        finally:
            self._lock.release()

    def _refresh(self, force: bool) -> None:
        """The body of :meth:`refresh`, under its lock."""
        self._checked = time.monotonic()
        try:
            version, model, chains, shadow_version = self._current_state()
            serving = chains.serving_name or self.runtime.settings.encoder
            if serving != self._serving:
                # Promotion or rollback: the old screener serves until the new one is built.
                self.runtime.switch_encoder(serving)
                self._serving, force = serving, True
            if force or self._screener is None or model != self._model:
                self._model = model
                self._load()
            elif version != self.version and not self._catch_up():
                self._load()
            self._refresh_shadow(chains, shadow_version)
        except Exception as exc:  # database down: keep the screener, report it
            logger.warning("snapshot check failed: %s", exc)
            self._error = self._error or f"snapshot check failed: {type(exc).__name__}"
            return
        self._heartbeat()

    def _catch_up(self) -> bool:
        """Apply the delta versions after the loaded one in place (no full reload); False
        when they do not apply, or are refused (then the screener is dropped at once and the
        caller reloads in full: fail closed)."""
        assert self._screener is not None
        blocklist = self._screener.blocklist
        previous = blocklist.version
        try:
            with self.runtime.sessions() as session:
                done = catch_up(
                    session, self.runtime.keyring, self.runtime.settings.snapshots_dir, blocklist
                )
        except (SnapshotError, CryptoError, BlocklistError, ValueError) as exc:
            # The blocklist may hold part of the chain: no screening on it while reloading.
            self._screener = None
            logger.error("worker %s: delta refused, reloading in full: %s", self.worker_id, exc)
            return False
        if done:
            self._loaded_at = datetime.now(UTC)
            logger.info(
                "worker %s applied deltas v%s -> v%d in place (%d entries)",
                self.worker_id,
                previous,
                blocklist.version,
                len(blocklist),
            )
        return done

    def _load(self) -> None:
        try:
            try:
                blocklist = self.runtime.load_blocklist()
            except UnknownKeyError:
                self.runtime.reload_keyring()
                blocklist = self.runtime.load_blocklist()
            screener = self.runtime.screener(blocklist)
        except (SnapshotError, CryptoError, BlocklistError) as exc:
            # Fail closed: no screener at all, rather than the old (possibly stale) blocklist.
            self._screener = None
            self._error = str(exc)[:1000]
            logger.error("worker %s does not screen: %s", self.worker_id, exc)
            return
        previous = self.version
        self._screener, self._error = screener, None
        self._loaded_at = datetime.now(UTC)
        logger.info(
            "worker %s loaded snapshot v%d (%d entries; was %s)",
            self.worker_id,
            blocklist.version,
            len(blocklist),
            previous,
        )

    def _refresh_shadow(self, chains: EncoderChains, version: int) -> None:
        """Load (or drop) the migration target's screener when its chain changed."""
        if chains.shadow_name is None or chains.migration_id is None or not version:
            self._shadow, self._shadow_key = None, None
            return
        key = (chains.migration_id, version)
        if key == self._shadow_key:
            return
        try:
            screener = self.runtime.shadow_screener(chains.shadow_name)
        except Exception as exc:  # the shadow never affects serving
            logger.warning("worker %s: no shadow screener: %s", self.worker_id, exc)
            self._shadow, self._shadow_key = None, None
            return
        self._shadow, self._shadow_key = Shadow(chains.migration_id, screener), key
        logger.info(
            "worker %s shadows with %s (snapshot v%d)", self.worker_id, chains.shadow_name, version
        )

    def _heartbeat(self) -> None:
        try:
            with transaction(self.runtime.sessions) as session:
                session.merge(
                    WorkerHeartbeat(
                        id=self.worker_id,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        encoder_id=str(self.runtime.encoder.id) if self._screener else None,
                        snapshot_version=self.version,
                        snapshot_loaded_at=self._loaded_at,
                        error=self._error,
                        started_at=self.started_at,
                        updated_at=datetime.now(UTC),
                    )
                )
        except Exception as exc:  # readiness goes stale, which is the right signal
            logger.warning("could not write worker heartbeat: %s", exc)

    def screener(self) -> Screener:
        """The current screener, re-checked at most every ``poll_interval`` seconds.

        Raises:
            SnapshotUnavailable: no verified snapshot (the message says why).
        """
        if time.monotonic() - self._checked >= self.poll_interval:
            # While the watcher builds another screener (a new snapshot, a promotion), tasks
            # go on with the current one instead of waiting for it.
            self.refresh(wait=self._screener is None)
        current = self._screener
        if current is None:
            raise SnapshotUnavailable(self._error or "no snapshot loaded")
        return current

    def start_watcher(self) -> None:
        """Poll in a daemon thread, so an idle worker also reloads and keeps its heartbeat."""

        def run() -> None:
            while not self._stop.wait(self.poll_interval):
                try:
                    self.refresh()
                except Exception:  # the watcher must outlive any one failure
                    logger.exception("snapshot watcher failed")

        self._thread = threading.Thread(target=run, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
