"""Review commands: ``moderation review allow-proposals|approve-allow|reject-allow``, the
two-person rule for allow banks (:mod:`moderation.governance.allow_proposals`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from moderation.cli import Context, echo_json, echo_rows, initialised_runtime, main, pass_ctx

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

AS_HELP = (
    "Email of the active reviewer or admin who decides (audited as that user); it must not be "
    "the proposer."
)


@main.group()
def review() -> None:
    """Review-queue decisions that need a second person."""


def _user_id(runtime: Runtime, email: str) -> int:
    """The id of the user ``email`` (usage error when there is none)."""
    from moderation.governance.users import get_user_by_email

    with runtime.sessions() as session:
        user = get_user_by_email(session, email)
        if user is None:
            raise click.UsageError(f"no user {email!r}")
        return int(user.id)


@review.command("allow-proposals")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per proposal.")
@pass_ctx
def review_allow_proposals(ctx: Context, as_json: bool) -> None:
    """List pending allow proposals: a reviewer's "not a match" asking to add the upload's image
    to an allow bank, waiting for a second reviewer or an admin."""
    from dataclasses import asdict

    from moderation.governance.allow_proposals import pending_allow_proposals

    with initialised_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = [asdict(view) for view in pending_allow_proposals(session)]
    echo_rows(
        rows,
        ["approval_id", "bank", "upload_id", "review_item_id", "requester_email", "created_at"],
        as_json=as_json,
    )


@review.command("approve-allow")
@click.argument("approval_id", type=int)
@click.option("--as", "email", required=True, help=AS_HELP)
@pass_ctx
def review_approve_allow(ctx: Context, approval_id: int, email: str) -> None:
    """Approve allow proposal APPROVAL_ID: the upload's image joins the allow bank (new snapshot
    version) and from then on suppresses block-bank matches it ties or beats. Prints
    {"approval_id", "bank", "upload_id", "entry_id", "snapshot_version"}."""
    from dataclasses import asdict

    from moderation.governance.allow_proposals import approve_allow
    from moderation.governance.approvals import ApprovalError

    with initialised_runtime(ctx, ApprovalError) as runtime:
        done = approve_allow(runtime, approval_id, approver_id=_user_id(runtime, email))
    echo_json(asdict(done))


@review.command("reject-allow")
@click.argument("approval_id", type=int)
@click.option("--as", "email", required=True, help="Email of the active reviewer or admin.")
@pass_ctx
def review_reject_allow(ctx: Context, approval_id: int, email: str) -> None:
    """Reject (or, as the proposer, withdraw) allow proposal APPROVAL_ID: nothing is added."""
    from moderation.governance.approvals import ApprovalError, reject
    from moderation.storage.db import transaction

    with initialised_runtime(ctx, ApprovalError) as runtime:
        user_id = _user_id(runtime, email)
        with transaction(runtime.sessions) as session:
            reject(session, approval_id, approver_id=user_id)
    echo_json({"approval_id": approval_id, "state": "rejected"})
