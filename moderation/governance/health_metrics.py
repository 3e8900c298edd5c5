"""Operational ages read from the database at scrape time, for the alert rules in
``monitoring/prometheus/rules.yml``: the oldest queued upload, the snapshot age per bank,
each worker's lag behind the current snapshot, the master keys' ages and overdue erasure
requests; and :func:`health_report`, the same figures with the checks an operator runs to
call an incident over (``moderation status``).

They are read by the web process's ``/metrics`` (``admin/api/status.py``) from the database,
which every machine shares, so they are true fleet-wide whichever web process is scraped (a
worker's own ``/metrics``, ``workers/metrics_server.py``, carries only its processes' figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.snapshot import SnapshotError
from moderation.banks.versions import current_snapshot, read_payload
from moderation.crypto.errors import CryptoError
from moderation.governance.erasure_requests import overdue_requests
from moderation.service.metrics import database_samples
from moderation.service.worker_health import worker_reports
from moderation.storage.models import AuditEvent, Bank, Upload

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

#: Upload statuses that still wait for a result (``Upload.status``).
WAITING_STATUSES = ("queued", "processing")


@dataclass(frozen=True)
class HealthSamples:
    """Ages in seconds (floats >= 0) and counts, as exported by ``/metrics``.

    ``oldest_queued_upload_s`` is 0 when nothing waits. ``snapshot_age_s`` maps every enabled
    bank to the age of the current snapshot version holding its entries (empty before the first
    snapshot). ``worker_lag_s`` maps alive worker ids to how long a newer snapshot has existed
    while the worker still serves an older one (0 when current). ``key_age_s`` maps each master
    key id to the time since it became primary (its ``keys.rotate`` audit event; for keys older
    than every rotation, the deployment's first audit event). ``overdue_erasures`` counts open
    erasure requests older than ``overdue_days``.
    """

    oldest_queued_upload_s: float
    snapshot_age_s: dict[str, float]
    worker_lag_s: dict[str, float]
    key_age_s: dict[str, float]
    overdue_erasures: int


def _age(value: datetime | None, now: datetime) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return max(0.0, (now - value).total_seconds())


def key_ages(session: Session, key_ids: tuple[str, ...], now: datetime) -> dict[str, float]:
    """Seconds since each of ``key_ids`` became primary (see :class:`HealthSamples`); keys
    with no audit trail at all (an empty log) are left out."""
    first = session.scalar(select(func.min(AuditEvent.ts)))
    ages: dict[str, float] = {}
    for key_id in key_ids:
        promoted = session.scalar(
            select(func.max(AuditEvent.ts)).where(
                AuditEvent.action == "keys.rotate", AuditEvent.target == f"key:{key_id}"
            )
        )
        since = promoted if promoted is not None else first
        if since is not None:
            ages[key_id] = _age(since, now)
    return ages


def health_samples(
    session: Session,
    key_ids: tuple[str, ...],
    *,
    alive_within: float,
    overdue_days: int = 25,
) -> HealthSamples:
    """Read :class:`HealthSamples` now. ``alive_within`` (s) selects the workers counted;
    ``overdue_days`` is the erasure dashboard's margin before GDPR Art. 12(3)'s one month."""
    now = datetime.now(UTC)
    oldest = session.scalar(
        select(func.min(Upload.received_at)).where(Upload.status.in_(WAITING_STATUSES))
    )
    snapshot = current_snapshot(session)
    banks = session.scalars(select(Bank.name).where(Bank.enabled.is_(True)).order_by(Bank.name))
    snapshot_age = {} if snapshot is None else dict.fromkeys(banks, _age(snapshot.created_at, now))
    _, reports = worker_reports(session, alive_within=alive_within)
    return HealthSamples(
        oldest_queued_upload_s=_age(oldest, now),
        snapshot_age_s=snapshot_age,
        worker_lag_s={r.worker_id: r.stale_s or 0.0 for r in reports},
        key_age_s=key_ages(session, key_ids, now),
        overdue_erasures=len(overdue_requests(session, overdue_days)),
    )


def _snapshot_state(runtime: Runtime, session: Session, now: datetime) -> dict[str, Any]:
    """The current snapshot's row and whether its file decrypts and verifies now."""
    row = current_snapshot(session)
    if row is None:
        return {"version": 0, "verified": False, "error": "no snapshot yet (import a bank)"}
    state: dict[str, Any] = {
        "version": row.version,
        "file": Path(row.path).name,
        "sha256": row.sha256,
        "key_id": row.key_id,
        "encoder_id": row.encoder_id,
        "entry_count": row.entry_count,
        "age_s": round(_age(row.created_at, now), 1),
        "verified": True,
        "error": None,
    }
    try:
        read_payload(
            session, runtime.keyring, runtime.settings.snapshots_dir, row, embeddings=False
        )
    except (SnapshotError, CryptoError) as exc:
        state.update(verified=False, error=str(exc))
    return state


def health_report(
    runtime: Runtime, *, max_wait_s: float = 300.0, max_lag_s: float = 60.0
) -> dict[str, Any]:
    """What an operator checks to call an incident over (``moderation status``), as JSON-ready
    values, with ``ok`` and the ``problems`` (strings) that make it false: an upload waiting
    longer than ``max_wait_s`` (s; the queue alert's threshold), a current snapshot that does not
    decrypt and verify, no worker alive, a worker reporting an error or serving an older
    snapshot for more than ``max_lag_s`` (s), an overdue erasure request. Also the unscannable
    results by reason (``poison``: workers died screening the upload).
    """
    alive_within = max(3 * runtime.settings.snapshot_poll_interval, 30.0)
    now = datetime.now(UTC)
    with runtime.sessions() as session:
        samples = health_samples(
            session,
            runtime.keyring.key_ids,
            alive_within=alive_within,
            overdue_days=runtime.settings.erasure_deadline_days,
        )
        waiting = session.scalar(
            select(func.count()).select_from(Upload).where(Upload.status.in_(WAITING_STATUSES))
        )
        snapshot = _snapshot_state(runtime, session, now)
        unscannable = database_samples(session).results_by_reason
        _, reports = worker_reports(session, alive_within=alive_within)
    workers: list[dict[str, Any]] = [
        {"id": r.worker_id, "snapshot_version": r.snapshot_version, "error": r.error,
         "lag_s": round(samples.worker_lag_s.get(r.worker_id, 0.0), 1),
         "seen_s_ago": round(r.seen_s_ago, 1)}
        for r in reports
    ]  # fmt: skip
    problems = []
    if samples.oldest_queued_upload_s > max_wait_s:
        problems.append(f"an upload has waited {samples.oldest_queued_upload_s:.0f} s")
    if not snapshot["verified"]:
        problems.append(f"snapshot: {snapshot['error']}")
    if not workers:
        problems.append("no worker has reported (is `moderation worker` running?)")
    for worker in workers:
        if worker["error"] or worker["lag_s"] > max_lag_s:
            problems.append(f"worker {worker['id']}: {worker['error'] or 'old snapshot'}")
    if samples.overdue_erasures:
        problems.append(f"{samples.overdue_erasures} erasure requests are overdue")
    return {
        "ok": not problems,
        "problems": problems,
        "uploads_waiting": int(waiting or 0),
        "unscannable_by_reason": unscannable,
        "oldest_queued_upload_s": round(samples.oldest_queued_upload_s, 1),
        "snapshot": snapshot,
        "workers": workers,
        "primary_key": runtime.keyring.primary_id,
        "key_age_s": {k: round(v, 1) for k, v in samples.key_age_s.items()},
        "overdue_erasures": samples.overdue_erasures,
    }
