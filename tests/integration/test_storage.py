"""Storage against both databases: SQLite in the data dir and PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from moderation.audit.log import GENESIS_HASH, compute_hash, event_body, record_event
from moderation.banks.blocklist import load_blocklist
from moderation.banks.records import BlocklistError, create_bank, get_bank
from moderation.banks.retention import prune_snapshots
from moderation.banks.snapshot_payload import EntrySignals
from moderation.banks.versions import EncoderMismatchError, commit_signals
from moderation.config import load_settings
from moderation.crypto.keys import load_keyring
from moderation.matching.decision import ScreeningResult
from moderation.matching.recording import record_result
from moderation.service.runtime import Runtime
from moderation.service.subjects import find_subject, pseudonymize
from moderation.service.uploads import BlobMissingError, create_upload, read_upload, shred_upload
from moderation.storage.db import migrate, schema_is_current, transaction
from moderation.storage.models import AuditEvent, Entry, ReviewItem, Screening, Subject, Upload

pytestmark = pytest.mark.postgres

ENCODER_ID = "test/encoder|sha256=00|dim=8"
DIM = 8


@pytest.fixture
def rt(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    settings = load_settings(data_dir=tmp_path / "var", database_url=database_url)
    settings.ensure_dirs()
    load_keyring(settings, create_dev=True)
    runtime = Runtime(settings)
    assert not schema_is_current(runtime.engine)
    migrate(runtime.engine)
    yield runtime
    runtime.engine.dispose()


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def add_entries(rt: Runtime, bank: str, n: int, seed: int) -> list[int]:
    vectors = unit_vectors(n, seed)
    rng = np.random.default_rng(seed)
    with transaction(rt.sessions) as session:
        bank_row = get_bank(session, bank)
        entries = [Entry(bank_id=bank_row.id) for _ in range(n)]
        session.add_all(entries)
        session.flush()
        signals = [EntrySignals(e.id, vectors[i], rng.bytes(32), 80) for i, e in enumerate(entries)]
        commit_signals(
            session,
            keyring=rt.keyring,
            snapshots_dir=rt.settings.snapshots_dir,
            encoder_id=ENCODER_ID,
            dim=DIM,
            added=signals,
        )
        ids = [e.id for e in entries]
    with transaction(rt.sessions) as session:
        prune_snapshots(session, rt.settings.snapshots_dir)
    return ids


def test_migrations_are_idempotent_and_current(rt: Runtime) -> None:
    migrate(rt.engine)
    assert schema_is_current(rt.engine)


def test_banks_entries_and_snapshots_round_trip(rt: Runtime) -> None:
    with transaction(rt.sessions) as session:
        create_bank(session, "known-bad")
        create_bank(session, "benign", kind="allow")
    with pytest.raises(BlocklistError, match="already exists"), transaction(rt.sessions) as s:
        create_bank(s, "known-bad")
    first = add_entries(rt, "known-bad", 5, seed=1)
    second = add_entries(rt, "benign", 3, seed=2)
    with rt.sessions() as session:
        blocklist = load_blocklist(
            session, rt.keyring, rt.settings.snapshots_dir, encoder_id=ENCODER_ID, dim=DIM
        )
    assert blocklist.version == 2 and len(blocklist) == 8
    assert {info.bank_kind for info in blocklist.entries.values()} == {"block", "allow"}
    query = unit_vectors(5, seed=1)[3:4]
    (hits,) = blocklist.cosine.search(query, 3, 0.5)
    assert hits[0].id == first[3] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert set(second) <= set(blocklist.entries)
    # v2 only added entries: a delta, whose base v1 is kept until compaction retires both.
    assert len(list(rt.settings.snapshots_dir.glob("*.snapshot"))) == 2
    with rt.sessions() as session, pytest.raises(EncoderMismatchError):
        load_blocklist(
            session, rt.keyring, rt.settings.snapshots_dir, encoder_id="other|sha256=1|x", dim=DIM
        )


def test_audit_events_form_a_hash_chain(rt: Runtime) -> None:
    for i in range(3):
        with transaction(rt.sessions) as session:
            record_event(
                session, actor="cli", action="test.step", target=f"t:{i}", details={"i": i}
            )
    with rt.sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert [e.seq for e in events] == [1, 2, 3]
    previous = GENESIS_HASH
    for event in events:
        assert event.prev_hash == previous
        assert event.hash == compute_hash(previous, event_body(event))
        previous = event.hash


def test_a_failed_action_leaves_no_audit_event(rt: Runtime) -> None:
    with pytest.raises(RuntimeError), transaction(rt.sessions) as session:
        record_event(session, actor="cli", action="test.fails")
        raise RuntimeError("the action failed after its event was written")
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0


def test_uploads_encrypted_and_shredded(rt: Runtime) -> None:
    blobs = rt.settings.blobs_dir
    with transaction(rt.sessions) as session:
        upload = create_upload(session, b"image bytes", keyring=rt.keyring, blobs_dir=blobs)
        upload_id = upload.id
    with transaction(rt.sessions) as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        assert read_upload(upload, keyring=rt.keyring, blobs_dir=blobs) == b"image bytes"
        assert b"image bytes" not in (blobs / str(upload.blob_ref)).read_bytes()
        assert shred_upload(upload, blobs_dir=blobs)
    with rt.sessions() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None and upload.wrapped_key is None
        with pytest.raises(BlobMissingError):
            read_upload(upload, keyring=rt.keyring, blobs_dir=blobs)


def test_subject_pseudonyms_are_stable_keyed_and_never_raw(rt: Runtime) -> None:
    with transaction(rt.sessions) as session:
        a1 = pseudonymize(session, rt.keyring, "user-42@example.com")
        a2 = pseudonymize(session, rt.keyring, "user-42@example.com")
        b = pseudonymize(session, rt.keyring, "user-43@example.com")
    assert a1 == a2 != b
    with rt.sessions() as session:
        rows = session.scalars(select(Subject)).all()
        assert len(rows) == 2
        for row in rows:
            assert "user-4" not in f"{row.lookup}{row.ref}{row.secret!r}"
        subject = find_subject(session, rt.keyring, "user-42@example.com")
        assert subject is not None and subject.ref == a1
        assert find_subject(session, rt.keyring, "nobody") is None


def test_record_result_is_idempotent_and_queues_review(rt: Runtime) -> None:
    result = ScreeningResult(
        decision="review",
        policy="default",
        score=0.7,
        reason=None,
        category="default",
        matches=(),
        timings_ms={"total": 1.0},
        encoder_id=ENCODER_ID,
        index_version=0,
        classifier_version=None,
        review_priority=60,
        explanation={},
    )
    with transaction(rt.sessions) as session:
        upload = create_upload(session, b"x", keyring=rt.keyring, blobs_dir=rt.settings.blobs_dir)
        first = record_result(session, upload, result)
        again = record_result(session, upload, result)
        assert first is again
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Screening)) == 1
        item = session.scalar(select(ReviewItem))
        assert item is not None and item.priority == 60 and item.state == "open"
        assert session.scalar(select(Upload.status)) == "done"
