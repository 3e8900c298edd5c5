"""Per-client screening scope and policy (tenant isolation, issue 14).

An API client's uploads match only the banks that apply to it
(:func:`moderation.banks.tenancy.applicable_bank_ids`) and are decided under its own policy
when it has one (``api_clients.policy``, a file in the policies directory), else the
deployment's active policy. Uploads without a client (CLI, console) use every bank and the
active policy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from moderation.audit.log import record_event
from moderation.banks.tenancy import applicable_bank_ids, client_named
from moderation.matching.candidates import EVERY_BANK, Scope

if TYPE_CHECKING:
    from moderation.service.runtime import Runtime

#: A policy name is a file stem in the policies directory: no path separators or dots.
POLICY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def client_scope(session: Session, runtime: Runtime, client_id: int | None) -> Scope:
    """The screening scope of an upload of ``client_id`` (None: every bank, active policy).

    Raises:
        moderation.matching.policy.PolicyError: the client's policy file is gone or invalid.
    """
    if client_id is None:
        return EVERY_BANK
    from moderation.storage.models import ApiClient

    client = session.get(ApiClient, client_id)
    policy_name = None if client is None else client.policy
    return Scope(
        banks=applicable_bank_ids(session, client_id), policy=runtime.policy_named(policy_name)
    )


def set_client_policy(
    session: Session, runtime: Runtime, client_name: str, policy: str | None, *, actor: str
) -> None:
    """Screen ``client_name``'s uploads under ``policy`` (None: the active policy), audited
    ``api_client.set_policy``.

    Raises:
        moderation.banks.records.BlocklistError: unknown client.
        moderation.matching.policy.PolicyError: the policy name is malformed, or its file is
            missing or invalid (checked now, not at the first upload).
    """
    from moderation.matching.policy import PolicyError, load_policy

    client = client_named(session, client_name)
    if policy is not None:
        if not POLICY_NAME.match(policy):
            raise PolicyError(f"policy name {policy!r} must be letters, digits, '-' or '_'")
        load_policy(runtime.settings.policies_dir, policy)
    client.policy = policy
    record_event(
        session,
        actor=actor,
        action="api_client.set_policy",
        target=f"client:{client.id}",
        details={"name": client.name, "policy": policy},
    )
