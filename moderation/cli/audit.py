"""Audit log and GDPR commands: ``moderation audit ...`` and ``moderation gdpr ...``.

Exit codes: 0 success; 1 the audit chain, an export or a receipt does not verify; 2 usage
(click, or a missing ``--yes``); 3 configuration or integrity errors (``config_errors``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from moderation.cli import (
    Context,
    echo_json,
    echo_rows,
    initialised_runtime,
    main,
    pass_ctx,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

VERIFY_FAILED_EXIT = 1
ACTOR = "cli"


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (e.g. 2026-01-31 or 2026-01-31T12:00Z)",
            param_hint=option,
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _subject_argument(subject_id: str) -> str:
    # "-" reads the id from stdin, so it stays out of shell history and the process list.
    value = sys.stdin.readline().strip() if subject_id == "-" else subject_id.strip()
    if not value:
        raise click.UsageError("the subject id is empty")
    return value


def _public_key_of_deployment(runtime: Any) -> str | None:
    """The deployment's audit public key (hex), or None when its signing key is missing."""
    from moderation.audit.log import AuditKeyError, public_key_hex, signing_key

    with runtime.sessions() as session:
        try:
            return public_key_hex(signing_key(session, runtime.keyring))
        except AuditKeyError:
            return None


def _required_public_key(runtime: Any) -> str:
    key = _public_key_of_deployment(runtime)
    if key is None:
        raise click.ClickException("this deployment has no audit key yet; pass --public-key")
    return key


def _verifying_key(ctx: Context, public_key: str | None) -> tuple[str, Ed25519PublicKey]:
    """``--public-key`` (hex), or else the deployment's own, with the key it loads to.

    Raises:
        click.BadParameter: ``--public-key`` is not 64 hex characters.
        click.ClickException: no ``--public-key`` and the deployment has no audit key yet.
    """
    from moderation.audit.offline import load_public_key

    if public_key is None:
        with initialised_runtime(ctx) as runtime:
            public_key = _required_public_key(runtime)
    try:
        return public_key, load_public_key(public_key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from None


# --- audit ----------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Tamper-evident audit log: verify, checkpoint, export."""


@audit.command("verify")
@click.option(
    "--public-key",
    default=None,
    help="Pin this audit public key (hex) instead of the one derived from the deployment's "
    "own secret; it must match that one too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def audit_verify(ctx: Context, public_key: str | None, as_json: bool) -> None:
    """Check the hash chain and the signed checkpoints; exit 1 naming the first bad seq."""
    from moderation.audit.verify import verify_chain

    with initialised_runtime(ctx) as runtime:
        if public_key is not None and public_key.strip().lower() != _public_key_of_deployment(
            runtime
        ):
            click.echo(
                "FAILED: the deployment's audit key is missing or differs from --public-key: "
                "the signing key was replaced",
                err=True,
            )
            sys.exit(VERIFY_FAILED_EXIT)
        with runtime.sessions() as session:
            result = verify_chain(session, keyring=runtime.keyring, public_key=public_key)
    if as_json:
        echo_json(dataclasses.asdict(result))
    elif result.ok:
        click.echo(
            f"OK: {result.count} events, head seq {result.head_seq}, {result.checkpoints} "
            f"signed checkpoints, audit key {result.public_key}"
        )
    else:
        click.echo(
            f"FAILED at seq {result.first_bad_seq}: {result.problem} "
            f"({result.count} events verified before it)",
            err=True,
        )
    if not result.ok:
        sys.exit(VERIFY_FAILED_EXIT)


@audit.command("checkpoint")
@click.option(
    "--if-due",
    is_flag=True,
    help="Only when MODERATION_AUDIT_CHECKPOINT_EVERY events were added since the last one.",
)
@pass_ctx
def audit_checkpoint(ctx: Context, if_due: bool) -> None:
    """Sign the current head of the chain (run periodically, e.g. from cron)."""
    from moderation.audit.log import checkpoint_if_due, write_checkpoint
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        if if_due:
            every = ctx.settings.audit_checkpoint_every
            checkpoint = checkpoint_if_due(session, runtime.keyring, every=every)
        else:
            checkpoint = write_checkpoint(session, runtime.keyring)
        row = (
            None
            if checkpoint is None
            else {"seq": checkpoint.seq, "head_hash": checkpoint.head_hash}
        )
    echo_json({"checkpoint": row})


@audit.command("public-key")
@pass_ctx
def audit_public_key(ctx: Context) -> None:
    """Print the audit public key (hex); keep a copy offline to pin it when verifying."""
    from moderation.audit.log import public_key_hex, signing_key
    from moderation.storage.db import transaction

    with initialised_runtime(ctx) as runtime, transaction(runtime.sessions) as session:
        key = signing_key(session, runtime.keyring, create=True, actor=ACTOR)
    click.echo(public_key_hex(key))


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), required=True)
@click.option("--since", default=None, help="From this time (ISO 8601, UTC when no zone).")
@click.option("--until", default=None, help="Before this time (ISO 8601, UTC when no zone).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the signed manifest goes; default OUT.manifest.json.",
)
@pass_ctx
def audit_export(
    ctx: Context,
    fmt: str,
    since: str | None,
    until: str | None,
    out_path: Path,
    manifest_path: Path | None,
) -> None:
    """Export events with a signed manifest (the export itself is audited)."""
    from moderation.audit.export import export_events
    from moderation.audit.log import signing_key
    from moderation.storage.db import transaction

    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    manifest_path = manifest_path or out_path.with_name(out_path.name + ".manifest.json")
    with (
        initialised_runtime(ctx) as runtime,
        transaction(runtime.sessions) as session,
        open(out_path, "wb") as out,
    ):
        key = signing_key(session, runtime.keyring, create=True, actor=ACTOR)
        manifest = export_events(
            session,
            fmt="csv" if fmt == "csv" else "jsonl",
            since=start,
            until=end,
            out=out,
            actor=ACTOR,
            signing_key=key,
        )
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    click.echo(
        f"wrote {manifest['count']} events to {out_path} and the manifest to {manifest_path}; "
        "verify offline with: python -m moderation.audit.offline "
        f"{out_path} {manifest_path} --public-key {manifest['public_key']}",
        err=True,
    )
    echo_json(manifest)


@audit.command("verify-export")
@click.argument("export_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("manifest_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--public-key",
    default=None,
    help="The audit public key (hex); default: this deployment's own.",
)
@pass_ctx
def audit_verify_export(
    ctx: Context, export_file: Path, manifest_file: Path, public_key: str | None
) -> None:
    """Check an export against its manifest; exit 1 naming the first bad line."""
    from moderation.audit.offline import verify_export

    _, key = _verifying_key(ctx, public_key)
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    check = verify_export(export_file.read_bytes(), manifest, key)
    if not check.ok:
        where = f" at line {check.line}" if check.line is not None else ""
        click.echo(f"FAILED{where}: {check.problem}", err=True)
        sys.exit(VERIFY_FAILED_EXIT)
    click.echo(f"OK: {check.count} events, seq {manifest['first_seq']}..{manifest['last_seq']}")


@audit.command("verify-receipt")
@click.argument("receipt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--public-key", default=None, help="Default: this deployment's own audit key.")
@pass_ctx
def audit_verify_receipt(ctx: Context, receipt_file: Path, public_key: str | None) -> None:
    """Check the Ed25519 signature of an erasure receipt."""
    from moderation.audit.offline import RECEIPT_TYPE, verify_signature

    public_key, key = _verifying_key(ctx, public_key)
    receipt = json.loads(receipt_file.read_text(encoding="utf-8"))
    problem = verify_signature(receipt, key, expected_type=RECEIPT_TYPE)
    if problem:
        click.echo(f"FAILED: {problem}", err=True)
        sys.exit(VERIFY_FAILED_EXIT)
    click.echo(f"OK: receipt {receipt.get('request_id')} is signed by {public_key}")


# --- gdpr -----------------------------------------------------------------------------------


@main.group()
def gdpr() -> None:
    """Erasure by data subject (GDPR Art. 17) and legal holds."""


@gdpr.command("preview")
@click.argument("subject_id")
@pass_ctx
def gdpr_preview(ctx: Context, subject_id: str) -> None:
    """Counts per store that erasing SUBJECT_ID ("-": read from stdin) would remove."""
    from moderation.governance.erasure_stores import GdprError
    from moderation.governance.gdpr import preview_erasure

    subject = _subject_argument(subject_id)
    with initialised_runtime(ctx, GdprError) as runtime:
        counts = preview_erasure(runtime, subject)
    echo_json(counts)


@gdpr.command("request")
@click.argument("subject_id")
@pass_ctx
def gdpr_request(ctx: Context, subject_id: str) -> None:
    """Register an erasure request for SUBJECT_ID (its deadline starts now)."""
    from moderation.governance.erasure_requests import register_request

    subject = _subject_argument(subject_id)
    with initialised_runtime(ctx) as runtime:
        request_id = register_request(runtime, subject, actor=ACTOR)
    echo_json({"request_id": request_id})


@gdpr.command("erase")
@click.argument("subject_id")
@click.option("--dry-run", is_flag=True, help="Only count what would be erased.")
@click.option("--yes", is_flag=True, help="Confirm: erasure cannot be undone.")
@pass_ctx
def gdpr_erase(ctx: Context, subject_id: str, dry_run: bool, yes: bool) -> None:
    """Erase everything held about SUBJECT_ID ("-": read it from stdin); print the receipt.

    Resumable: rerun the same command after an interruption.
    """
    from moderation.governance.erasure_stores import GdprError
    from moderation.governance.gdpr import erase_subject

    if not (dry_run or yes):
        raise click.UsageError("erasure cannot be undone: add --yes (or use --dry-run)")
    subject = _subject_argument(subject_id)
    with initialised_runtime(ctx, GdprError) as runtime:
        receipt = erase_subject(runtime, subject, actor=ACTOR, dry_run=dry_run)
    echo_json(receipt)


@gdpr.command("requests")
@click.option("--overdue", is_flag=True, help="Only open requests past the deadline.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per request.")
@pass_ctx
def gdpr_requests(ctx: Context, overdue: bool, as_json: bool) -> None:
    """List erasure requests (newest first), or the overdue ones (oldest first)."""
    from moderation.governance.erasure_requests import list_requests, overdue_requests

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = (
            overdue_requests(session, days=ctx.settings.erasure_deadline_days)
            if overdue
            else list_requests(session)
        )
    echo_rows(rows, ["id", "state", "received_at", "requested_by"], as_json=as_json)


@gdpr.command("held")
@pass_ctx
def gdpr_held(ctx: Context) -> None:
    """List uploads kept under legal hold after their subject's erasure."""
    from moderation.governance.holds import held_uploads

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = held_uploads(session)
    for row in rows:
        echo_json(row)


@gdpr.command("read-held")
@click.argument("upload_id")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--reason", required=True, help="Why the evidence is accessed (audited).")
@pass_ctx
def gdpr_read_held(ctx: Context, upload_id: str, out_path: Path, reason: str) -> None:
    """Decrypt a held upload to OUT (for a lawful request); the access is audited."""
    from moderation.crypto.files import write_private_file
    from moderation.governance.erasure_stores import GdprError
    from moderation.governance.holds import read_held_upload

    with initialised_runtime(ctx, GdprError, ValueError) as runtime:
        data = read_held_upload(runtime, upload_id, actor=ACTOR, reason=reason)
    write_private_file(out_path, [data])
    echo_json({"upload_id": upload_id, "out": str(out_path), "bytes": len(data)})


@gdpr.command("release-holds")
@pass_ctx
def gdpr_release_holds(ctx: Context) -> None:
    """Release legal holds that have ended and erase the held uploads of erased subjects they
    kept (the beat task moderation.release_holds does this hourly)."""
    from moderation.governance.erasure_stores import GdprError
    from moderation.governance.holds import release_expired_holds

    with initialised_runtime(ctx, GdprError) as runtime:
        counts = release_expired_holds(runtime, actor=ACTOR)
    echo_json(counts)
