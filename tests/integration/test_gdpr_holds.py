"""RELIABILITY.md G2: an upload under legal hold survives its subject's erasure, detached,
cited in the receipt, readable only through an audited access, and released when the hold ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, timedelta

import pytest
from sqlalchemy import func, select

from moderation.storage.models import (
    AuditEvent,
    Upload,
)
from tests.integration.conftest import (
    ALICE,
    HOLD_BASIS,
    World,
    assert_references_unresolvable,
    audit_verify_passes,
    best_cosines,
    run_cli,
    walk_every_store,
)

# --- G2 -------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_g2_upload_under_legal_hold_is_kept_and_cited(
    make_world: Callable[..., World],
    cli_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from moderation.governance.holds import held_uploads, read_held_upload, release_expired_holds

    caplog.set_level(logging.DEBUG, logger="moderation")
    world = make_world(hold=True)
    assert world.held == world.alice["rocket"]
    with world.runtime.sessions() as session:
        upload = session.get(Upload, world.held)
        assert upload is not None and upload.legal_hold_until is not None
        until = upload.legal_hold_until
    before = best_cosines(world)
    result = run_cli(world, cli_env, "gdpr", "erase", ALICE, "--yes")
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout)
    assert receipt["counts"]["uploads"] == 2
    assert receipt["counts"]["labelled_pairs"] == 1  # from the reviewer's confirm of coffee
    assert "redis_keys" not in receipt["counts"]
    held = receipt["held"]
    assert held["uploads"] == 1
    assert held["kept"]["uploads"] == 1 and held["kept"]["blobs"] == 1
    assert held["kept"]["screenings"] == 1 and held["kept"]["review_items"] == 0
    (exception,) = held["exceptions"]
    assert exception["citation"] == f"{HOLD_BASIS}: 1 year"
    assert exception["category"] == "csam" and exception["uploads"] == 1

    walk_every_store(world, before, caplog)
    assert_references_unresolvable(world)
    audit_verify_passes(world, cli_env)

    # Kept: encrypted, detached from the person, readable only through an audited access.
    with world.runtime.sessions() as session:
        upload = session.get(Upload, world.held)
        assert upload is not None and upload.subject_ref is None
        assert upload.erasure_request_id == receipt["request_id"]
        assert [h["upload_id"] for h in held_uploads(session)] == [world.held]
        events_before = session.scalar(select(func.count()).select_from(AuditEvent))
    data = read_held_upload(world.runtime, world.held, actor="user:9", reason="NCMEC request 42")
    assert data == world.images["rocket"].read_bytes()
    with world.runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == events_before + 1
        last = session.scalar(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1))
        assert last is not None and last.action == "upload.read_held"
        assert last.actor == "user:9" and last.target == f"upload:{world.held}"
        assert last.details["reason"] == "NCMEC request 42"

    # Before the hold ends nothing is released; afterwards the upload is erased for good.
    assert release_expired_holds(world.runtime, actor="cli")["uploads"] == 0
    released = release_expired_holds(
        world.runtime, actor="cli", now=until.replace(tzinfo=UTC) + timedelta(seconds=1)
    )
    assert released["uploads"] == 1 and released["blobs"] == 1 and released["screenings"] == 1
    with world.runtime.sessions() as session:
        assert session.get(Upload, world.held) is None
    assert not list(world.settings.blobs_dir.rglob(f"{world.held}*"))
    audit_verify_passes(world, cli_env)
