"""Encoder upgrade, blue-green (issue 18 item 1), in one process: the originals vault, the
migration job building the target's snapshot chain (resumable), chains kept in sync by bank
changes, shadow screening, and a worker following promotion and rollback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select

from moderation.banks.delta_chain import chain_of
from moderation.banks.encoder_chains import encoder_chains
from moderation.banks.operations import delete_entries, import_bank
from moderation.banks.originals import read_original, vault_dir
from moderation.banks.records import create_bank_audited
from moderation.banks.retention import kept_snapshots
from moderation.banks.versions import current_snapshot, read_payload
from moderation.config import Settings
from moderation.governance.keys import rotate_keys
from moderation.modelops.encoder_migration import MigrationError, run_migration, start_migration
from moderation.modelops.encoder_promotion import PromotionRefused, promote, rollback
from moderation.modelops.encoder_status import encoder_status
from moderation.service.queue import process_upload
from moderation.service.runtime import Runtime
from moderation.service.uploads import create_upload
from moderation.service.worker import WorkerState
from moderation.storage.db import transaction
from moderation.storage.encoders import EncoderMigration, EntryOriginal, ShadowDecision
from moderation.storage.models import AuditEvent, Entry, IndexSnapshot, Screening
from tests.conftest import skimage_photo
from tests.tiny_clip import relaxed_slo_policies, tiny_clip_encoder

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """SLOs the tiny test encoder meets, so the canary gate runs and passes unless a test
    builds a runtime with the repository's policies."""
    return settings.model_copy(update={"policies_dir": relaxed_slo_policies(tmp_path / "pol")})


def _jpeg(name: str) -> bytes:
    image = skimage_photo(name)
    image.thumbnail((128, 128))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _bank(runtime: Runtime, tmp_path: Path, name: str, photos: list[str], retain: bool) -> None:
    folder = tmp_path / name
    folder.mkdir()
    for photo in photos:
        (folder / f"{photo}.jpg").write_bytes(_jpeg(photo))
    with transaction(runtime.sessions) as session:
        create_bank_audited(
            session, name, kind="block", category=name, actor="test", retain_originals=retain
        )
    import_bank(runtime, name, [folder], actor="test")


def _entry_ids(runtime: Runtime, bank_name: str) -> list[int]:
    from moderation.storage.models import Bank

    with runtime.sessions() as session:
        return list(
            session.scalars(
                select(Entry.id).join(Bank).where(Bank.name == bank_name).order_by(Entry.id)
            )
        )


def test_retained_originals_are_sealed_and_crypto_shredded(
    runtime: Runtime, tmp_path: Path
) -> None:
    _bank(runtime, tmp_path, "kept", ["chelsea", "coffee"], retain=True)
    _bank(runtime, tmp_path, "plain", ["rocket"], retain=False)
    kept, plain = _entry_ids(runtime, "kept"), _entry_ids(runtime, "plain")
    directory = vault_dir(runtime.settings.resolved_data_dir)
    with runtime.sessions() as session:
        assert sorted(session.scalars(select(EntryOriginal.entry_id))) == kept
        assert read_original(
            session, kept[0], keyring=runtime.keyring, directory=directory
        ) == _jpeg("chelsea")
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "bank.create")
        ).first()
        assert event is not None and event.details["retain_originals"] is True
    blob = (directory / f"{kept[0]}.original").read_bytes()
    assert _jpeg("chelsea")[200:264] not in blob  # ciphertext only
    assert not (directory / f"{plain[0]}.original").exists()

    delete_entries(runtime, [kept[0]], actor="test")
    with runtime.sessions() as session:
        assert session.get(EntryOriginal, kept[0]) is None
        assert session.get(EntryOriginal, kept[1]) is not None
    assert not (directory / f"{kept[0]}.original").exists()

    # Key rotation re-wraps the vault's data keys: readable with only the new master key.
    report = rotate_keys(runtime, retire_old=True, actor="test")
    assert report.retired
    runtime.reload_keyring()
    with runtime.sessions() as session:
        row = session.get(EntryOriginal, kept[1])
        assert row is not None and row.key_id == runtime.keyring.primary_id
        data = read_original(session, kept[1], keyring=runtime.keyring, directory=directory)
    assert data == _jpeg("coffee")


def _payload_ids(runtime: Runtime, encoder_id: str) -> tuple[set[int], set[int]]:
    """(embedded entry ids, PDQ-only entry ids) of the newest snapshot of a chain."""
    with runtime.sessions() as session:
        row = current_snapshot(session, encoder_id)
        assert row is not None
        payload = read_payload(session, runtime.keyring, runtime.settings.snapshots_dir, row)
    return set(payload.entry_ids.tolist()), set(payload.hashes.entry_ids.tolist())


def test_migration_is_resumable_and_kept_in_sync(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tiny_clip_encoder(tmp_path / "clip", monkeypatch)
    _bank(runtime, tmp_path, "kept", ["chelsea", "coffee", "astronaut"], retain=True)
    _bank(runtime, tmp_path, "plain", ["rocket"], retain=False)
    kept, plain = _entry_ids(runtime, "kept"), _entry_ids(runtime, "plain")
    source_id = str(runtime.encoder.id)

    started = start_migration(runtime, target, actor="test")
    assert (started.state, started.total, started.without_originals) == ("running", 3, 1)
    with pytest.raises(MigrationError, match="one migration at a time"):
        start_migration(runtime, target, actor="test")

    # Stopped after one step (a worker restart): the next run goes on from there.
    partial = run_migration(runtime, started.migration_id, step=2, max_steps=1)
    assert (partial.state, partial.done) == ("running", 2)
    done = run_migration(runtime, started.migration_id, step=2)
    assert (done.state, done.done) == ("ready", 3) and done.entries_per_second

    with runtime.sessions() as session:
        chains = encoder_chains(session)
    assert chains.serving_id == source_id and chains.shadow_name == target
    assert chains.shadow_id is not None and chains.shadow_id != source_id
    embedded, by_pdq = _payload_ids(runtime, chains.shadow_id)
    assert embedded == set(kept) and by_pdq == set(plain)
    assert _payload_ids(runtime, source_id)[0] == set(kept + plain)

    # A deletion reaches both chains; pruning keeps exactly one snapshot per chain.
    delete_entries(runtime, [kept[0]], actor="test")
    assert kept[0] not in _payload_ids(runtime, chains.shadow_id)[0]
    assert kept[0] not in _payload_ids(runtime, source_id)[0]
    # (A delta head keeps the versions it builds on: moderation.banks.delta_chain.)
    with runtime.sessions() as session:
        heads = kept_snapshots(session)
        chains_kept = {row.version for head in heads for row in chain_of(session, head)}
        versions = set(session.scalars(select(IndexSnapshot.version)))
    assert len(heads) == 2 and versions == chains_kept
    assert len(list(runtime.settings.snapshots_dir.glob("*.snapshot"))) == len(versions)

    status = encoder_status(runtime)
    assert status["migration"]["state"] == "ready" and status["shadow"] == target
    banks = {b["bank"]: b for b in status["banks"]}
    assert banks["kept"]["retain_originals"] and banks["kept"]["matched_by"] == "embeddings and PDQ"
    assert "current encoder until promotion" in banks["plain"]["matched_by"]


def _screen(runtime: Runtime, state: WorkerState, data: bytes) -> Screening:
    with transaction(runtime.sessions) as session:
        upload = create_upload(
            session, data, keyring=runtime.keyring, blobs_dir=runtime.settings.blobs_dir
        )
        upload_id = upload.id
    process_upload(runtime, upload_id, state.screener, max_attempts=3, shadow=state.shadow)
    with runtime.sessions() as session:
        row = session.scalar(select(Screening).where(Screening.upload_id == upload_id))
        assert row is not None
        session.expunge(row)
        return row


def test_worker_shadows_then_follows_promotion_and_rollback(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tiny_clip_encoder(tmp_path / "clip", monkeypatch)
    _bank(runtime, tmp_path, "kept", ["chelsea", "coffee"], retain=True)
    state = WorkerState(runtime, poll_interval=0.0)
    state.refresh()
    source_id = str(runtime.encoder.id)
    assert state.shadow() is None

    migration = start_migration(runtime, target, actor="test").migration_id
    run_migration(runtime, migration)
    before = _screen(runtime, state, _jpeg("chelsea"))
    assert before.decision == "block" and before.encoder_id == source_id
    with runtime.sessions() as session:
        shadows = session.scalars(select(ShadowDecision)).all()
        assert [(s.upload_id, s.decision) for s in shadows] == [(before.upload_id, "block")]
        assert shadows[0].category == "kept" and shadows[0].migration_id == migration
    status = encoder_status(runtime, canary=True)
    agreement = status["shadow_agreement"]
    assert agreement["uploads"] == 1 and set(agreement["by_category"]) == {"kept"}
    assert {"micro_ap", "recall_review", "false_positive_rate"} <= set(status["canary"]["source"])
    assert status["canary"]["target"]["encoder"] == target
    assert "false_positive_rate" in status["canary"]["target"]

    # Under the repository's SLOs the tiny random encoder is refused, with the figures.
    strict = Runtime(runtime.settings.model_copy(update={"policies_dir": REPO_POLICIES}))
    with pytest.raises(PromotionRefused, match="below the canary SLOs") as refused:
        promote(strict, actor="test")
    assert refused.value.figures["pairs"] > 0 and not refused.value.figures["passed_slo"]
    with runtime.sessions() as session:
        outcomes = session.scalars(
            select(AuditEvent.outcome).where(AuditEvent.action == "encoder.promote")
        ).all()
        assert outcomes == ["refused"]
        assert session.get(EncoderMigration, migration).state == "ready"

    stale = Runtime(runtime.settings)  # a long-lived process that chose its encoder before
    assert str(stale.encoder.id) == source_id
    switched = promote(runtime, actor="test")
    assert switched.serving == target
    after = _screen(runtime, state, _jpeg("chelsea"))
    target_id = str(runtime.encoder.id)
    assert target_id != source_id and after.encoder_id == target_id
    assert after.decision == "block" and state.shadow() is None
    # That process's next import follows the promotion: embedded with the target.
    _bank(stale, tmp_path, "late", ["astronaut"], retain=True)
    (late,) = _entry_ids(runtime, "late")
    assert late in _payload_ids(runtime, target_id)[0]
    assert late in _payload_ids(runtime, source_id)[1]  # PDQ only in the kept source chain

    rollback(runtime, actor="test")
    back = _screen(runtime, state, _jpeg("coffee"))
    assert back.encoder_id == source_id and back.decision == "block"
    with runtime.sessions() as session:
        actions = set(session.scalars(select(AuditEvent.action)))
    assert {"encoder.migrate", "encoder.migration_ready", "encoder.promote"} <= actions
    assert "encoder.rollback" in actions
