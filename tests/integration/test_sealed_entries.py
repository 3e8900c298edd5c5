"""Nothing banned readable in the database (issue 14, item 8): entry labels and source refs are
sealed (AES-256-GCM under a per-bank key wrapped by the master keys), content hashes of bank
entries and uploads are keyed (HMAC). Authorised readers (CLI, console, API, hash-list export)
still see them through :func:`moderation.banks.sealed_fields.entry_fields`; key rotation
re-wraps the bank keys; migration 0012 converts existing plaintext rows.

Run on SQLite and PostgreSQL (``database_url``)."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text

from moderation.banks.hash_export import export_hashes
from moderation.banks.hash_import import add_signals, signal_record
from moderation.banks.hashlists.records import HashRecord
from moderation.banks.operations import import_bank, list_entries
from moderation.banks.records import create_bank
from moderation.banks.sealed_fields import (
    entry_fields,
    hmac_key,
    keyed_sha256,
    migration_attributes,
)
from moderation.config import load_settings
from moderation.crypto.keys import KeyRing
from moderation.governance.keys import rotate_keys
from moderation.service.operations import screen_paths
from moderation.service.results import upload_view
from moderation.service.runtime import Runtime, prepared_runtime
from moderation.storage.db import create_db_engine, migrate, session_factory, transaction
from moderation.storage.models import Bank, Entry, Upload
from tests.conftest import skimage_photo

FILE_STEM = "banned-photo-7f3c9e"
HASH_LABEL = "hash-list label QX81"
HASH_REF = "ncmec:entry-55821"
PDQ = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def _runtime(tmp_path: Path, database_url: str) -> Runtime:
    return prepared_runtime(load_settings(data_dir=tmp_path / "var", database_url=database_url))


def _dump(runtime: Runtime) -> list[tuple[str, str, bytes]]:
    """(table, column, bytes) of every cell of every table: text as UTF-8, binary as is and hex."""
    cells: list[tuple[str, str, bytes]] = []
    with runtime.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():
                for column, value in row.items():
                    if isinstance(value, bytes | bytearray | memoryview):
                        raw = bytes(value)
                        cells += [(table, column, raw), (table, column, raw.hex().encode())]
                    elif value is not None:
                        cells.append((table, column, str(value).encode()))
    return cells


def _assert_not_in_database(runtime: Runtime, needles: list[bytes]) -> None:
    for table, column, cell in _dump(runtime):
        for needle in needles:
            assert needle.lower() not in cell.lower(), f"{table}.{column} holds {needle!r}"
    if runtime.engine.dialect.name == "sqlite":
        db_file = Path(str(runtime.engine.url.database))
        for path in (db_file, db_file.with_name(db_file.name + "-wal")):
            if path.exists():
                raw = path.read_bytes()
                for needle in needles:
                    assert needle not in raw, f"{path.name} holds {needle!r}"


def _banned_world(tmp_path: Path, runtime: Runtime) -> tuple[Path, bytes]:
    """A block bank with one imported photo (its file name a label) and a hash-list bank; a
    user upload of the same photo screened (and blocked)."""
    photo = tmp_path / "bank" / f"{FILE_STEM}.jpg"
    photo.parent.mkdir()
    skimage_photo("chelsea").save(photo, quality=90)
    with transaction(runtime.sessions) as session:
        create_bank(session, "known")
        create_bank(session, "hashes")
    assert len(import_bank(runtime, "known", [photo], actor="cli").added) == 1
    record = signal_record({"pdq": PDQ}, ref=HASH_REF, label=HASH_LABEL)
    assert add_signals(runtime, "hashes", [record], actor="cli", source="x.csv", label="").added
    copy = tmp_path / "upload" / "incoming.jpg"
    copy.parent.mkdir()
    shutil.copyfile(photo, copy)
    results = screen_paths(runtime, [copy], subject_id="subject-1", on_result=lambda _: None)
    assert results[0].decision == "block"
    return photo, photo.read_bytes()


def test_sql_holds_no_hash_label_or_file_name_of_a_banned_image(
    tmp_path: Path, database_url: str
) -> None:
    runtime = _runtime(tmp_path, database_url)
    try:
        photo, data = _banned_world(tmp_path, runtime)
        sha = hashlib.sha256(data).hexdigest()
        needles = [sha.encode(), FILE_STEM.encode(), HASH_LABEL.encode(), HASH_REF.encode()]
        _assert_not_in_database(runtime, needles)

        # The keyed forms are what is stored: duplicates are still found by comparing them.
        with runtime.sessions() as session:
            keyed = keyed_sha256(hmac_key(session, runtime.keyring), data)
            entry = session.scalar(select(Entry).where(Entry.source_hmac == keyed))
            assert entry is not None
            upload = session.scalar(select(Upload))
            assert upload is not None and upload.content_hmac == keyed
        again = import_bank(runtime, "known", [photo], actor="cli")
        assert not again.added and again.skipped == [(photo.name, "duplicate")]

        # Authorised readers see them: CLI listing, API result, hash-list export.
        (listed,) = list_entries(runtime, "known")
        assert listed["label"] == FILE_STEM and listed["source_ref"] == photo.name
        with runtime.sessions() as session:
            upload = session.scalar(select(Upload))
            assert upload is not None
            view = upload_view(session, upload, runtime.keyring)
            assert view["result"]["matches"][0]["label"] == FILE_STEM
            stored = upload_view(session, upload, None)  # what a callback row keeps
            assert stored["result"]["matches"][0]["label"] is None
        out = io.StringIO()
        assert export_hashes(runtime, "hashes", out, fmt="te-csv", actor="cli") == 1
        assert "QX81" in out.getvalue()
    finally:
        runtime.engine.dispose()


@pytest.fixture
def sqlite_runtime(tmp_path: Path) -> Iterator[Runtime]:
    runtime = _runtime(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield runtime
    runtime.engine.dispose()


def _hash_entries(runtime: Runtime, records: list[HashRecord]) -> list[int]:
    """Bank "hashes" with ``records`` as hash-list entries; their entry ids."""
    with transaction(runtime.sessions) as session:
        create_bank(session, "hashes")
    return add_signals(runtime, "hashes", records, actor="cli", source="x", label="").entry_ids


def test_a_moved_or_altered_sealed_label_does_not_decrypt(sqlite_runtime: Runtime) -> None:
    from moderation.crypto.errors import DecryptionError

    runtime = sqlite_runtime
    first, second = _hash_entries(
        runtime,
        [
            signal_record({"pdq": PDQ}, ref="a", label="first"),
            signal_record({"pdq": PDQ.replace("f8", "07", 1)}, ref="b", label="second"),
        ],
    )
    with transaction(runtime.sessions) as session:
        one, two = session.get(Entry, first), session.get(Entry, second)
        assert one is not None and two is not None
        one.label_sealed = two.label_sealed  # a label copied onto another entry
    with runtime.sessions() as session, pytest.raises(DecryptionError):
        entry_fields(session, runtime.keyring, [first])


def test_key_rotation_rewraps_the_bank_entry_keys(sqlite_runtime: Runtime) -> None:
    runtime = sqlite_runtime
    (eid,) = _hash_entries(runtime, [signal_record({"pdq": PDQ}, ref=HASH_REF, label=HASH_LABEL)])
    old = runtime.keyring.primary_id
    report = rotate_keys(runtime, retire_old=True, actor="cli")
    assert report.rewrapped["bank_entry_keys"] == 1 and report.retired == [old]
    assert old not in runtime.keyring
    with runtime.sessions() as session:
        assert entry_fields(session, runtime.keyring, [eid])[eid].label == HASH_LABEL
        bank = session.scalar(select(Bank).where(Bank.name == "hashes"))
        assert bank is not None and bank.entry_key is not None
        assert runtime.keyring.primary_id.encode() in bank.entry_key


def test_migration_0012_seals_existing_plaintext_rows(tmp_path: Path, database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        migrate(engine, "0006")
        data = b"the bytes of a banned file"
        sha = hashlib.sha256(data).hexdigest()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO banks (id, name, kind, category, enabled, created_at) "
                    "VALUES (1, 'old', 'block', 'default', true, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text("INSERT INTO entries (id, bank_id, label, source_ref, source_sha256, "
                     "added_by, added_at, disabled, origin) VALUES (7, 1, :label, :ref, :sha, "
                     "'cli', CURRENT_TIMESTAMP, false, 'image')"),
                {"label": FILE_STEM, "ref": f"/imports/{FILE_STEM}.jpg", "sha": sha},
            )  # fmt: skip
            conn.execute(
                text("INSERT INTO uploads (id, source, received_at, updated_at, status, "
                     "attempts, sha256) VALUES ('u1', 'cli', CURRENT_TIMESTAMP, "
                     "CURRENT_TIMESTAMP, 'done', 0, :sha)"),
                {"sha": sha},
            )  # fmt: skip
        with pytest.raises(RuntimeError, match="needs the master keys"):
            migrate(engine)  # no key ring: refuses rather than lose or keep the plaintext
        ring = KeyRing.generate()
        migrate(engine, attributes=migration_attributes(ring))

        columns = {c["name"] for c in inspect(engine).get_columns("entries")}
        assert {"label", "source_ref", "source_sha256"}.isdisjoint(columns)
        assert "sha256" not in {c["name"] for c in inspect(engine).get_columns("uploads")}
        sessions = session_factory(engine)
        with sessions() as session:
            fields = entry_fields(session, ring, [7])[7]
            assert fields.label == FILE_STEM and fields.source_ref == f"/imports/{FILE_STEM}.jpg"
            keyed = keyed_sha256(hmac_key(session, ring), data)
            entry, upload = session.get(Entry, 7), session.get(Upload, "u1")
            assert entry is not None and entry.source_hmac == keyed
            assert upload is not None and upload.content_hmac == keyed
        if engine.dialect.name == "sqlite":
            engine.dispose()  # the last connection's close checkpoints the write-ahead log
            db_file = Path(str(engine.url.database))
            for path in (db_file, db_file.with_name(db_file.name + "-wal")):
                raw = path.read_bytes() if path.exists() else b""
                assert FILE_STEM.encode() not in raw and sha.encode() not in raw, path.name
    finally:
        engine.dispose()


def test_fresh_database_migrates_without_keys(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        migrate(engine)  # nothing to convert: no key ring needed
        assert "label_sealed" in {c["name"] for c in inspect(engine).get_columns("entries")}
    finally:
        engine.dispose()
