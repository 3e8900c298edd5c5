"""The self-contained verifier (moderation.audit.offline): hashing, signatures, CSV cells."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from moderation.audit.log import public_key_hex, sign_document
from moderation.audit.offline import (
    CHECKPOINT_TYPE,
    CSV_COLUMNS,
    GENESIS_HASH,
    MANIFEST_TYPE,
    RECEIPT_TYPE,
    canonical_json,
    compute_hash,
    escape_cell,
    load_public_key,
    main,
    unescape_cell,
    verify_signature,
)


def test_canonical_json_is_key_order_and_whitespace_independent() -> None:
    a = {"b": [1, 2.5, None], "a": {"y": "é", "x": True}}
    b = json.loads(json.dumps(a, indent=4))
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":true,"y":"é"},"b":[1,2.5,null]}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_event_hash_is_sha256_of_previous_hash_bytes_then_canonical_body() -> None:
    body = {"seq": 1, "actor": "cli", "details": {"k": 1}, "prev_hash": GENESIS_HASH}
    expected = hashlib.sha256(bytes(32) + canonical_json(body)).hexdigest()
    assert compute_hash(GENESIS_HASH, body) == expected
    assert compute_hash(GENESIS_HASH, {**body, "actor": "cli "}) != expected


def test_signatures_bind_content_key_and_document_type() -> None:
    key = Ed25519PrivateKey.generate()
    public = load_public_key(public_key_hex(key))
    signed = sign_document({"type": MANIFEST_TYPE, "count": 3}, key)
    assert verify_signature(signed, public, expected_type=MANIFEST_TYPE) is None
    assert verify_signature({**signed, "count": 4}, public, expected_type=MANIFEST_TYPE)
    # The same signature cannot pass for another kind of document.
    assert verify_signature({**signed, "type": RECEIPT_TYPE}, public, expected_type=RECEIPT_TYPE)
    assert verify_signature(signed, public, expected_type=CHECKPOINT_TYPE)
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_signature(signed, other, expected_type=MANIFEST_TYPE)
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    assert verify_signature(unsigned, public, expected_type=MANIFEST_TYPE)
    with pytest.raises(ValueError, match="type"):
        sign_document({"count": 1}, key)


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_public_key_must_be_32_bytes_of_hex(bad: str) -> None:
    with pytest.raises(ValueError):
        load_public_key(bad)


@given(st.text())
def test_csv_cells_round_trip_through_formula_escaping(value: str) -> None:
    escaped = escape_cell(value)
    assert not escaped.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert unescape_cell(escaped) == value
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([escaped, "x"])
    (row,) = csv.reader(io.StringIO(buffer.getvalue(), newline=""))
    assert unescape_cell(row[0]) == value


def test_csv_columns_cover_every_hashed_field() -> None:
    assert set(CSV_COLUMNS) == {
        "seq", "ts", "actor", "action", "target", "origin", "outcome", "details", "prev_hash",
        "hash",
    }  # fmt: skip


def test_command_line_verifies_receipts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = Ed25519PrivateKey.generate()
    receipt = sign_document({"type": RECEIPT_TYPE, "request_id": "r1", "counts": {}}, key)
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(receipt))
    assert main(["--receipt", str(path), "--public-key", public_key_hex(key)]) == 0
    assert "OK: receipt r1" in capsys.readouterr().out
    path.write_text(json.dumps({**receipt, "counts": {"uploads": 0}}))
    assert main(["--receipt", str(path), "--public-key", public_key_hex(key)]) == 1
    assert "FAILED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--public-key", public_key_hex(key)])
    assert usage.value.code == 2
