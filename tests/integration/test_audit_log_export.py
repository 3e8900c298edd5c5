"""RELIABILITY.md A7: audit exports verify offline, and edited, re-hashed or dropped lines, a
wrong key and a wrong window fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from moderation.audit.export import export_events
from moderation.audit.log import (
    compute_hash,
    public_key_hex,
    record_event,
    signing_key,
)
from moderation.audit.offline import load_public_key, verify_export
from moderation.storage.db import transaction
from moderation.storage.models import AuditEvent
from tests.conftest import (
    Db,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- A7: exports ----------------------------------------------------------------------------


def _export(db: Db, fmt: str, **window: Any) -> tuple[bytes, dict[str, Any]]:
    buffer = BytesIO()
    with transaction(db.sessions) as session:
        key = signing_key(session, db.keyring)
        manifest = export_events(
            session,
            fmt="csv" if fmt == "csv" else "jsonl",
            since=window.get("since"),
            until=window.get("until"),
            out=buffer,
            actor="user:7",
            signing_key=key,
        )
    return buffer.getvalue(), manifest


def _public_key(db: Db) -> str:
    with db.sessions() as session:
        return public_key_hex(signing_key(session, db.keyring))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a7_export_verifies_and_one_edited_line_fails_on_that_line(db: Db, fmt: str) -> None:
    db.events(6)
    with transaction(db.sessions) as session:  # formula-looking and quoted cells round-trip
        record_event(
            session,
            actor="=cmd|' /C calc'!A0",
            action="test.csv",
            target='a "quoted", target',
            origin="-1+1",
            details={"text": "line\nbreak"},
        )
    data, manifest = _export(db, fmt)
    key = load_public_key(_public_key(db))
    assert manifest["count"] == 8 and manifest["first_seq"] == 1 and manifest["last_seq"] == 8
    check = verify_export(data, manifest, key)
    assert check.ok and check.count == 8, check
    if fmt == "csv":  # spreadsheet formulas are neutralised, and still verify
        assert b"'=cmd|" in data and b",'-1+1," in data
    # The export is itself audited.
    with db.sessions() as session:
        event = session.get(AuditEvent, manifest["export_event_seq"])
    assert event is not None and event.action == "audit.export" and event.actor == "user:7"
    assert event.details["file_sha256"] == manifest["file_sha256"]

    lines = data.decode("utf-8").splitlines(keepends=True)
    header = 1 if fmt == "csv" else 0
    target_line = header + 5  # thing:3 is seq 5 (seq 1 created the signing key)
    edited = lines[target_line - 1].replace("thing:3", "thing:9")
    assert edited != lines[target_line - 1]
    tampered = "".join([*lines[: target_line - 1], edited, *lines[target_line:]]).encode()
    check = verify_export(tampered, manifest, key)
    assert not check.ok
    assert check.line == target_line
    assert "hash mismatch" in (check.problem or "")


def test_a7_rehashed_edit_fails_at_the_next_link(db: Db) -> None:
    db.events(5)
    data, manifest = _export(db, "jsonl")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    lines[2]["actor"] = "user:666"
    body = {k: v for k, v in lines[2].items() if k != "hash"}
    lines[2]["hash"] = compute_hash(body["prev_hash"], body)
    from moderation.audit.offline import canonical_json

    tampered = b"".join(canonical_json(line) + b"\n" for line in lines)
    check = verify_export(tampered, manifest, load_public_key(_public_key(db)))
    assert not check.ok and check.line == 4


def test_a7_dropped_lines_wrong_key_and_window(db: Db) -> None:
    db.events(6)
    data, manifest = _export(db, "jsonl")
    key = load_public_key(_public_key(db))
    without_last = b"".join(data.splitlines(keepends=True)[:-1])
    assert not verify_export(without_last, manifest, key).ok
    without_middle = b"".join(
        line for i, line in enumerate(data.splitlines(keepends=True)) if i != 2
    )
    check = verify_export(without_middle, manifest, key)
    assert not check.ok and check.line == 3
    other = Ed25519PrivateKey.generate().public_key()
    check = verify_export(data, manifest, other)
    assert not check.ok and "signature" in (check.problem or "")
    forged = {**manifest, "count": 2}
    assert not verify_export(data, forged, key).ok
    # A time window exports one contiguous piece of the chain.
    with db.sessions() as session:
        ts = dict(session.execute(select(AuditEvent.seq, AuditEvent.ts)).all())
    part, part_manifest = _export(db, "csv", since=ts[3], until=ts[6])
    assert (part_manifest["first_seq"], part_manifest["last_seq"]) == (3, 5)
    assert verify_export(part, part_manifest, key).ok
    empty, empty_manifest = _export(db, "jsonl", since=datetime.now(UTC) + timedelta(days=1))
    assert empty == b"" and empty_manifest["count"] == 0
    assert verify_export(empty, empty_manifest, key).ok
    assert db.verify().ok  # the exports' own audit events kept the chain intact


def test_a7_offline_script_needs_nothing_but_cryptography(db: Db, tmp_path: Path) -> None:
    """The verifier file runs on its own (isolated mode, outside the repository)."""
    import shutil

    db.events(4)
    data, manifest = _export(db, "csv")
    (tmp_path / "export.csv").write_bytes(data)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    script = tmp_path / "verify_audit_export.py"
    shutil.copy(REPO_ROOT / "moderation" / "audit" / "offline.py", script)
    key = _public_key(db)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-I", str(script), *args, "--public-key", key],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = run("export.csv", "manifest.json")
    assert ok.returncode == 0, ok.stderr
    assert "OK: 5 events" in ok.stdout
    tampered = data.replace(b"thing:2", b"thing:7")
    (tmp_path / "export.csv").write_bytes(tampered)
    bad = run("export.csv", "manifest.json")
    assert bad.returncode == 1
    assert "FAILED at line 5" in bad.stderr  # header, then seq 1..; thing:2 is seq 4
