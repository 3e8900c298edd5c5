"""RELIABILITY.md A6 and the audit side of erasure: every state change writes exactly one
complete audit event, and an action whose audit event cannot be written does not happen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from moderation.audit.verify import verify_chain
from moderation.banks.operations import import_bank, set_bank_enabled
from moderation.banks.versions import current_snapshot
from moderation.crypto.keys import KeyRing
from moderation.service.operations import screen_paths
from moderation.service.runtime import Runtime
from moderation.service.subjects import find_subject
from moderation.storage.db import transaction
from moderation.storage.models import (
    AuditEvent,
    Entry,
    ErasureRequest,
    Upload,
)
from tests.integration.conftest import (
    ALICE,
    World,
    audit_verify_passes,
    receipt_public_key,
    run_cli,
)

# --- the audit event is part of the action ---------------------------------------------------


def _break_audit_inserts(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if runtime.engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'audit store down'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION audit_down()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit store down'); END"
                )
            )


def _repair_audit_inserts(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if runtime.engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER audit_down ON audit_events"))
        else:
            conn.execute(text("DROP TRIGGER audit_down"))


@pytest.mark.redis
@pytest.mark.slow
def test_actions_fail_when_their_audit_event_cannot_be_written(
    make_world: Callable[..., World],
    cli_env: pytest.MonkeyPatch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import moderation.governance.gdpr as gdpr
    from moderation.governance.gdpr import erase_subject

    world = make_world(hold=False)
    runtime = world.runtime
    with runtime.sessions() as session:
        uploads = session.scalar(select(func.count()).select_from(Upload))
        version = current_snapshot(session).version  # type: ignore[union-attr]
    files = sorted(runtime.settings.snapshots_dir.glob("*.snapshot"))  # a chain of deltas
    _break_audit_inserts(runtime)
    with pytest.raises(DBAPIError, match="audit store down"):
        set_bank_enabled(runtime, "known", enabled=False, actor="cli")
    with pytest.raises(DBAPIError, match="audit store down"):
        screen_paths(runtime, [world.images["chelsea"]], subject_id="carol", on_result=print)
    with pytest.raises(DBAPIError, match="audit store down"):
        erase_subject(runtime, ALICE, actor="cli")
    _repair_audit_inserts(runtime)
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == uploads
        snapshot = current_snapshot(session)
        assert snapshot is not None and snapshot.version == version
        from moderation.storage.models import Bank

        assert all(b.enabled for b in session.scalars(select(Bank)))
        assert find_subject(session, runtime.keyring, "carol") is None
        assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 0
    assert sorted(runtime.settings.snapshots_dir.glob("*.snapshot")) == files

    # The erasure's own closing event fails: the request stays open, and a rerun finishes it.
    real = gdpr.record_event

    def failing(session: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "gdpr.erase":
            raise DBAPIError("INSERT INTO audit_events", {}, Exception("audit store down"))
        return real(session, **kwargs)

    monkeypatch.setattr(gdpr, "record_event", failing)
    with pytest.raises(DBAPIError):
        erase_subject(runtime, ALICE, actor="cli")
    with runtime.sessions() as session:
        (request,) = session.scalars(select(ErasureRequest))
        assert request.state == "running" and request.receipt == {}
    monkeypatch.setattr(gdpr, "record_event", real)
    receipt = erase_subject(runtime, ALICE, actor="cli")
    assert receipt["request_id"] == request.id and receipt["counts"]["uploads"] == 2
    audit_verify_passes(world, cli_env)


# --- A6 -------------------------------------------------------------------------------------


def _assert_one_event(
    runtime: Runtime, action: str, run: Any, *, actor: str = "cli", count: int = 1
) -> None:
    """``run()`` writes ``count`` complete events of ``action`` by ``actor`` (A6)."""
    with runtime.sessions() as session:
        start = session.scalar(select(func.max(AuditEvent.seq))) or 0
    started = datetime.now(UTC) - timedelta(seconds=1)
    run()
    with runtime.sessions() as session:
        new = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.seq > start).order_by(AuditEvent.seq)
            )
        )
    matching = [e for e in new if e.action == action]
    assert len(matching) == count, (action, [e.action for e in new])
    for event in matching:
        assert event.actor == actor  # who
        assert event.target  # what it was done to
        assert event.origin  # from where
        assert event.outcome == "success"
        assert event.ts.replace(tzinfo=UTC) >= started  # when


def _bank_and_screening_events(world: World, cli_env: pytest.MonkeyPatch) -> None:
    from moderation.banks.operations import delete_entries, set_entry_disabled

    runtime = world.runtime
    one_event = functools.partial(_assert_one_event, runtime)
    one_event(
        "bank.create",
        lambda: run_cli(world, cli_env, "bank", "create", "extra", "--category", "default"),
    )
    one_event("bank.import", lambda: import_bank(runtime, "extra", [world.images["coffee"]],
                                                 actor="cli"))  # fmt: skip
    with runtime.sessions() as session:
        extra = max(session.scalars(select(Entry.id)))
    one_event(
        "entry.disable",
        lambda: set_entry_disabled(runtime, f"e_{extra}", disabled=True, actor="user:3"),
        actor="user:3",
    )
    one_event(
        "entry.enable",
        lambda: set_entry_disabled(runtime, f"e_{extra}", disabled=False, actor="user:3"),
        actor="user:3",
    )
    one_event("bank.disable", lambda: set_bank_enabled(runtime, "extra", enabled=False,
                                                       actor="cli"))  # fmt: skip
    one_event("entry.delete", lambda: delete_entries(runtime, [extra], actor="cli"))
    one_event(
        "screening.decide",
        lambda: screen_paths(
            runtime, [world.images["chelsea"], world.images["coffee"]], on_result=lambda r: None
        ),
        count=2,
    )


def _governance_events(world: World, cli_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from moderation.governance.erasure_requests import register_request
    from moderation.governance.gdpr import erase_subject
    from moderation.governance.holds import read_held_upload
    from moderation.governance.keys import rotate_keys

    runtime = world.runtime
    one_event = functools.partial(_assert_one_event, runtime)
    one_event("keys.rotate", lambda: rotate_keys(runtime, retire_old=True, actor="cli"))
    one_event(
        "audit.export",
        lambda: run_cli(world, cli_env, "audit", "export", "--format", "csv", "--out",
                        str(tmp_path / "a.csv")),
    )  # fmt: skip
    one_event("gdpr.request", lambda: register_request(runtime, ALICE, actor="user:5"),
              actor="user:5")  # fmt: skip
    one_event("gdpr.erase", lambda: erase_subject(runtime, ALICE, actor="user:5"),
              actor="user:5")  # fmt: skip
    assert world.held is not None
    one_event(
        "upload.read_held",
        lambda: read_held_upload(runtime, world.held or "", actor="user:9", reason="court order"),
        actor="user:9",
    )


@pytest.mark.redis
@pytest.mark.slow
def test_a6_every_state_change_writes_exactly_one_complete_event(
    make_world: Callable[..., World],
    tmp_path: Path,
    cli_env: pytest.MonkeyPatch,
) -> None:
    world = make_world(hold=True)
    runtime = world.runtime
    with transaction(runtime.sessions) as session:
        from moderation.audit.log import write_checkpoint

        write_checkpoint(session, runtime.keyring)
    audit_key = receipt_public_key(world)

    _bank_and_screening_events(world, cli_env)
    _governance_events(world, cli_env, tmp_path)
    # Key rotation re-wrapped the audit key (moderation.governance.keys, deployment_secrets step):
    # same key,
    # and the checkpoints signed before it still verify.
    assert receipt_public_key(world) == audit_key
    with runtime.sessions() as session:
        assert not session.scalars(
            select(ErasureRequest).where(ErasureRequest.state != "done")
        ).all()
        result = verify_chain(session, keyring=runtime.keyring)
    assert result.ok and result.checkpoints >= 2 and result.public_key == audit_key
    assert isinstance(runtime.keyring, KeyRing)
