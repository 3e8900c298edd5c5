"""Encoder upgrade, blue-green, on a real stack (issue 18 item 1): a bank is migrated from
EfficientNet-Lite0 to a second offline encoder by the workers' background job while a running
`moderation worker` screens uploads; no upload is lost or screened against no bank, shadow
agreement is reported, and `moderation encoder promote` / `rollback` each take effect on the
running worker without a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from moderation.banks.operations import import_bank
from moderation.banks.records import create_bank_audited
from moderation.modelops.encoder_migration import start_migration
from moderation.service.platform_client import ModerationClient
from moderation.service.runtime import Runtime
from moderation.storage.db import migrate, transaction
from moderation.storage.encoders import EncoderMigration, ShadowDecision
from moderation.storage.models import Screening, Upload, WorkerHeartbeat
from tests.integration.queue_stack import REPO, Stack, bank_images, upload_images, wait_until
from tests.tiny_clip import relaxed_slo_policies, tiny_clip_encoder

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.postgres]


def _init(stack: Stack, tmp_path: Path) -> Runtime:
    """Schema, a bank that retains originals (three photos) and one that does not (one)."""
    settings = stack.settings()
    settings.ensure_dirs()
    runtime = stack.runtime = Runtime(settings)
    migrate(runtime.engine)
    images = bank_images()
    for name, photos, retain in (
        ("kept", ["chelsea", "coffee"], True),
        ("plain", ["astronaut"], False),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for photo in photos:
            (folder / f"{photo}.jpg").write_bytes(images[photo])
        with transaction(runtime.sessions) as session:
            create_bank_audited(
                session, name, kind="block", category=name, actor="test", retain_originals=retain
            )
        import_bank(runtime, name, [folder], actor="test")
    return runtime


class Submitter(threading.Thread):
    """Posts an upload every ``interval`` s (a banned photo every third) until stopped."""

    def __init__(self, api: ModerationClient, interval: float = 0.7) -> None:
        super().__init__(daemon=True)
        self.api, self.interval = api, interval
        self.ids: list[str] = []
        self.banned: set[str] = set()
        self.errors: list[str] = []
        self.stopped = threading.Event()
        self._others = iter(upload_images(400, seed=11))

    def run(self) -> None:
        n = 0
        while not self.stopped.wait(self.interval):
            banned = n % 3 == 0
            data = bank_images()["chelsea"] if banned else next(self._others)
            try:
                answer = self.api.submit(data, external_id=f"u{n}", subject_id=f"s{n % 7}")
            except Exception as exc:  # recorded, asserted empty at the end
                self.errors.append(repr(exc))
            else:
                self.ids.append(answer["id"])
                if banned:
                    self.banned.add(answer["id"])
            n += 1


def _cli(stack: Stack, env: dict[str, str], *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "moderation", "encoder", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _worker_encoders(runtime: Runtime) -> set[str | None]:
    """The encoders of the worker processes heard from in the last 3 s (a pool process
    replaced meanwhile leaves its last heartbeat behind)."""
    since = datetime.now(UTC) - timedelta(seconds=3)
    with runtime.sessions() as session:
        return set(
            session.scalars(
                select(WorkerHeartbeat.encoder_id).where(WorkerHeartbeat.updated_at >= since)
            )
        )


def _screened_with(runtime: Runtime, encoder_id: str, after: int) -> bool:
    with runtime.sessions() as session:
        return bool(
            session.scalar(
                select(Screening.id).where(Screening.encoder_id == encoder_id, Screening.id > after)
            )
        )


def _last_screening(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(Screening.id).order_by(Screening.id.desc())) or 0)


def test_migrate_shadow_promote_rollback_on_a_running_worker(
    make_pg_stack: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tiny_clip_encoder(tmp_path / "clip", monkeypatch)
    # The canary gate runs on promotion; these SLOs let the tiny random encoder through.
    stack = make_pg_stack(policies_dir=relaxed_slo_policies(tmp_path / "policies"))
    runtime = _init(stack, tmp_path)
    source_id = str(runtime.encoder.id)
    client = stack.create_client([])
    # Every service process registers the tiny architecture (tests/tiny_clip.py).
    env = {"PYTHONPATH": f"{REPO}:{tmp_path / 'clip'}"}
    stack.start("web", "serve", "--port", str(stack.port), "--workers", "1", raw_env=env)
    stack.start("worker", "worker", "--concurrency", "2", raw_env=env)
    stack.start("beat", "beat", raw_env=env)
    stack.wait_ready()
    cli_env = {**stack.env(), **env}

    submitter = Submitter(ModerationClient(stack.base_url, client.token))
    submitter.start()
    try:
        migration = start_migration(runtime, target, actor="test").migration_id

        def state() -> str:
            with runtime.sessions() as session:
                row = session.get(EncoderMigration, migration)
                assert row is not None
                return row.state

        # Built by the workers' background job (beat -> maintenance queue), not by this process.
        wait_until(lambda: state() == "ready", 240, "the migration job to finish")
        with runtime.sessions() as session:
            row = session.get(EncoderMigration, migration)
            assert row is not None and (row.done, row.total, row.without_originals) == (2, 2, 1)
            target_id = row.target_id
        assert target_id and target_id != source_id
        metrics = stack.get_private("/metrics").text
        assert f'moderation_encoder_migration_progress_ratio{{target="{target}"}} 1.0' in metrics

        def shadowed() -> int:
            with runtime.sessions() as session:
                return len(session.scalars(select(ShadowDecision.id)).all())

        wait_until(lambda: shadowed() >= 4, 120, "shadow decisions from the worker")
        status = _cli(stack, cli_env, "status", "--json", "--no-canary")
        agreement = status["shadow_agreement"]
        assert isinstance(agreement, dict) and agreement["uploads"] >= 4
        assert set(agreement["by_category"]) <= {"kept", "plain", "none"}
        assert status["shadow"] == target and status["serving"] == runtime.settings.encoder
        print("shadow agreement:", json.dumps(agreement))

        mark = _last_screening(runtime)
        promoted = _cli(stack, cli_env, "promote")
        assert promoted["state"] == "promoted" and promoted["serving"] == target
        assert isinstance(promoted["canary"], dict) and promoted["canary"]["pairs"] > 0
        wait_until(lambda: _worker_encoders(runtime) == {target_id}, 60, "workers on the target")
        wait_until(lambda: _screened_with(runtime, target_id, mark), 60, "a target screening")

        mark = _last_screening(runtime)
        rolled = _cli(stack, cli_env, "rollback")
        assert rolled["state"] == "rolled_back"
        wait_until(lambda: _worker_encoders(runtime) == {source_id}, 60, "workers back")
        wait_until(lambda: _screened_with(runtime, source_id, mark), 60, "a source screening")
    finally:
        submitter.stopped.set()
        submitter.join(30)

    assert not submitter.errors, submitter.errors[:3]
    ids = submitter.ids

    def all_done() -> bool:
        with runtime.sessions() as session:
            statuses = session.scalars(select(Upload.status).where(Upload.id.in_(ids))).all()
            return len(statuses) == len(ids) and all(s == "done" for s in statuses)

    wait_until(all_done, 180, "every upload to be decided")
    with runtime.sessions() as session:
        rows = session.scalars(select(Screening).where(Screening.upload_id.in_(ids))).all()
    assert len(rows) == len(ids) > 20
    # Never screened against no bank: every result names a snapshot that holds the banks.
    assert all(r.index_version and r.index_version > 0 for r in rows)
    assert all(r.decision != "unscannable" for r in rows)
    assert {r.encoder_id for r in rows} == {source_id, target_id}
    assert all(r.decision == "block" for r in rows if r.upload_id in submitter.banned)
