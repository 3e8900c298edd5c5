"""Offline verification of audit exports, checkpoints and erasure receipts.

This module is deliberately self-contained: it imports only the standard library and
``cryptography``, never the rest of :mod:`moderation`, so an auditor can copy this one file to
any machine and run it::

    python audit_offline.py EXPORT MANIFEST --public-key HEX
    python audit_offline.py --receipt RECEIPT.json --public-key HEX

(or ``python -m moderation.audit.offline ...`` where the package is installed). ``HEX`` is the
deployment's audit public key, obtained out of band from ``moderation audit public-key``: a key
taken from the manifest itself would prove nothing, since whoever edited the file could have
re-signed it. Exit status 0 when everything verifies, 1 otherwise (the message names the first
bad line), 2 for usage errors.

Formats (shared with :mod:`moderation.audit.log`, which imports its hashing from here):

* Event hash: SHA-256 over the previous event's hash (32 raw bytes) followed by the canonical
  JSON of the event body (the fields of :data:`EVENT_FIELDS`). The first event's ``prev_hash``
  is :data:`GENESIS_HASH`.
* Canonical JSON: ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
  allow_nan=False)`` encoded as UTF-8 (the key-sorting, whitespace-free subset of RFC 8785; the
  values we sign hold only strings, integers, booleans, null and Python-``repr`` floats).
* Signed documents (checkpoints, export manifests, erasure receipts) are JSON objects with a
  ``type`` naming their kind and version, a ``public_key`` (Ed25519, 32 bytes hex) and a
  ``signature``: Ed25519 (RFC 8032) over the canonical JSON of the object without its
  ``signature`` field. The ``type`` field keeps one kind of signature from being replayed as
  another.
* JSONL export: one line per event, the canonical JSON of the event body plus ``hash``.
* CSV export (RFC 4180, ``\\r\\n`` line ends): header :data:`CSV_COLUMNS`; ``details`` holds
  canonical JSON; an empty ``target`` or ``origin`` cell is null (events never store empty
  strings there); a text cell that starts with ``= + - @ '``, tab or carriage return is written
  with one extra leading ``'`` so spreadsheets do not run it as a formula (OWASP "CSV
  Injection"), and the verifier strips it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event of a chain."""

EVENT_FIELDS = ("seq", "ts", "actor", "action", "target", "origin", "outcome", "details")
"""The hashed fields of an event, besides ``prev_hash``."""

CSV_COLUMNS = (*EVENT_FIELDS, "prev_hash", "hash")
"""Column order of CSV exports."""

NULLABLE_FIELDS = frozenset({"target", "origin"})

CHECKPOINT_TYPE = "moderation-audit-checkpoint/1"
MANIFEST_TYPE = "moderation-audit-export/1"
RECEIPT_TYPE = "moderation-erasure-receipt/1"

_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "'")


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact separators, UTF-8, no NaN.

    Raises:
        TypeError, ValueError: ``value`` is not JSON-serialisable (or holds NaN/infinity).
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def compute_hash(prev_hash: str, body: Mapping[str, Any]) -> str:
    """SHA-256 hex of ``prev_hash`` (64 hex chars, as raw bytes) then canonical JSON of ``body``.

    Raises:
        ValueError: ``prev_hash`` is not hex.
    """
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(prev_hash))
    digest.update(canonical_json(dict(body)))
    return digest.hexdigest()


def signed_bytes(document: Mapping[str, Any]) -> bytes:
    """The bytes an Ed25519 signature of ``document`` covers (everything but ``signature``)."""
    return canonical_json({k: v for k, v in document.items() if k != "signature"})


def load_public_key(public_key_hex: str) -> Ed25519PublicKey:
    """An Ed25519 public key from 64 hex characters.

    Raises:
        ValueError: not 32 bytes of hex.
    """
    try:
        raw = bytes.fromhex(public_key_hex.strip())
    except ValueError:
        raise ValueError("public key must be 64 hex characters") from None
    if len(raw) != 32:
        raise ValueError(f"public key must be 32 bytes (64 hex characters), got {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(
    document: Mapping[str, Any], public_key: Ed25519PublicKey, *, expected_type: str
) -> str | None:
    """None when ``document`` is of ``expected_type`` and signed by ``public_key``, else why not."""
    if document.get("type") != expected_type:
        return f"document type is {document.get('type')!r}, expected {expected_type!r}"
    signature = document.get("signature")
    if not isinstance(signature, str):
        return "document has no signature"
    try:
        public_key.verify(bytes.fromhex(signature), signed_bytes(document))
    except (InvalidSignature, ValueError):
        return "signature does not verify under the given public key"
    return None


def escape_cell(text: str) -> str:
    """Neutralise spreadsheet formulas: prefix ``'`` to a cell starting with a formula char."""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def unescape_cell(text: str) -> str:
    """Inverse of :func:`escape_cell`."""
    return text[1:] if text.startswith("'") else text


@dataclass(frozen=True)
class ExportCheck:
    """Outcome of :func:`verify_export`: ``line`` is the 1-based line of the first problem."""

    ok: bool
    count: int
    problem: str | None = None
    line: int | None = None


class _Bad(Exception):
    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


def _jsonl_events(data: bytes) -> Iterator[tuple[int, dict[str, Any], str]]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Bad(number, f"not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or set(obj) != {*EVENT_FIELDS, "prev_hash", "hash"}:
            raise _Bad(number, "not an audit event object (wrong fields)")
        stored = obj.pop("hash")
        if not isinstance(stored, str):
            raise _Bad(number, "hash is not a string")
        yield number, obj, stored


def _csv_events(data: bytes) -> Iterator[tuple[int, dict[str, Any], str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(None, f"not UTF-8: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        raise _Bad(1, f"header must be {','.join(CSV_COLUMNS)}")
    start = reader.line_num + 1
    for row in reader:
        number, start = start, reader.line_num + 1
        if len(row) != len(CSV_COLUMNS):
            raise _Bad(number, f"{len(row)} cells, expected {len(CSV_COLUMNS)}")
        cells = dict(zip(CSV_COLUMNS, row, strict=True))
        try:
            seq = int(cells["seq"])
            details = json.loads(cells["details"])
        except (ValueError, json.JSONDecodeError) as exc:
            raise _Bad(number, f"bad seq or details cell: {exc}") from None
        body: dict[str, Any] = {"seq": seq, "details": details, "prev_hash": cells["prev_hash"]}
        for name in ("ts", "actor", "action", "target", "origin", "outcome"):
            value = unescape_cell(cells[name])
            body[name] = None if (name in NULLABLE_FIELDS and value == "") else value
        yield number, body, cells["hash"]


def verify_export(
    data: bytes, manifest: Mapping[str, Any], public_key: Ed25519PublicKey
) -> ExportCheck:
    """Check an exported file against its signed manifest.

    In order: the manifest's signature under ``public_key``; every event's hash (an edited line
    fails here, naming its line); the chain links between consecutive events, from the
    manifest's ``first_prev_hash``; consecutive sequence numbers from ``first_seq``; the count,
    ``last_seq`` and ``head_hash``; finally the SHA-256 of the whole file.

    Args:
        data: the exported file's bytes (JSONL or CSV, as the manifest's ``file_format`` says).
        manifest: the parsed manifest JSON.
        public_key: the deployment's audit key, obtained out of band.
    """
    problem = verify_signature(manifest, public_key, expected_type=MANIFEST_TYPE)
    if problem:
        return ExportCheck(False, 0, f"manifest: {problem}")
    fmt = manifest.get("file_format")
    if fmt not in ("jsonl", "csv"):
        return ExportCheck(False, 0, f"manifest: unknown file_format {fmt!r}")
    events = _jsonl_events(data) if fmt == "jsonl" else _csv_events(data)
    prev = manifest.get("first_prev_hash")
    expected_seq = manifest.get("first_seq")
    last_seq: int | None = None
    count = 0
    try:
        for number, body, stored in events:
            seq = body.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise _Bad(number, f"seq {seq!r} is not an integer")
            try:
                recomputed = compute_hash(str(body["prev_hash"]), body)
            except (TypeError, ValueError) as exc:
                raise _Bad(number, f"seq {seq}: cannot hash: {exc}") from None
            if recomputed != stored:
                raise _Bad(number, f"seq {seq}: hash mismatch (the event was edited)")
            if body["prev_hash"] != prev:
                raise _Bad(number, f"seq {seq}: prev_hash does not link to the previous event")
            if seq != expected_seq:
                raise _Bad(number, f"seq {seq}: expected seq {expected_seq} (missing events)")
            prev, expected_seq, last_seq = stored, seq + 1, seq
            count += 1
        if count != manifest.get("count"):
            raise _Bad(None, f"{count} events, manifest says {manifest.get('count')}")
        if count and (last_seq != manifest.get("last_seq") or prev != manifest.get("head_hash")):
            raise _Bad(None, "last event does not match the manifest's last_seq and head_hash")
    except _Bad as bad:
        return ExportCheck(False, count, bad.problem, bad.line)
    if hashlib.sha256(data).hexdigest() != manifest.get("file_sha256"):
        return ExportCheck(False, count, "file SHA-256 differs from the manifest")
    return ExportCheck(True, count)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Verify a moderation audit export (or an erasure receipt) offline."
    )
    parser.add_argument("export", nargs="?", type=Path, help="the exported JSONL or CSV file")
    parser.add_argument("manifest", nargs="?", type=Path, help="its .manifest.json")
    parser.add_argument("--receipt", type=Path, help="verify a signed erasure receipt instead")
    parser.add_argument(
        "--public-key", required=True, help="the deployment's audit public key (64 hex chars)"
    )
    args = parser.parse_args(argv)
    try:
        key = load_public_key(args.public_key)
    except ValueError as exc:
        parser.error(str(exc))
    if args.receipt is not None:
        receipt = json.loads(args.receipt.read_text(encoding="utf-8"))
        problem = verify_signature(receipt, key, expected_type=RECEIPT_TYPE)
        if problem:
            print(f"FAILED: receipt {args.receipt}: {problem}", file=sys.stderr)
            return 1
        print(f"OK: receipt {receipt.get('request_id')} is signed by {args.public_key}")
        return 0
    if args.export is None or args.manifest is None:
        parser.error("give EXPORT and MANIFEST, or --receipt FILE")
    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    check = verify_export(args.export.read_bytes(), manifest, key)
    if not check.ok:
        where = f" at line {check.line}" if check.line is not None else ""
        print(f"FAILED{where}: {args.export}: {check.problem}", file=sys.stderr)
        return 1
    print(
        f"OK: {check.count} events (seq {manifest.get('first_seq')}..{manifest.get('last_seq')}), "
        f"head {manifest.get('head_hash')}, signed by {args.public_key}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
