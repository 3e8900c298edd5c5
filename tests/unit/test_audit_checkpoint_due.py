"""When the periodic task signs the audit chain head (count and age rules)."""

from __future__ import annotations

from datetime import timedelta

from moderation.audit.log import checkpoint_if_due, record_event, signing_key
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction


def append(rt: Runtime, n: int) -> None:
    with transaction(rt.sessions) as session:
        for i in range(n):
            record_event(session, actor="test", action="test.event", details={"i": i})


def test_count_rule_and_age_rule(runtime: Runtime) -> None:
    rt = runtime
    with transaction(rt.sessions) as session:
        signing_key(session, rt.keyring, create=True)
    hour = timedelta(hours=1)
    append(rt, 3)
    with transaction(rt.sessions) as session:
        # Never checkpointed: the age rule signs the first tail at once.
        first = checkpoint_if_due(session, rt.keyring, every=10, max_age=hour)
        assert first is not None
    append(rt, 2)
    with transaction(rt.sessions) as session:
        assert checkpoint_if_due(session, rt.keyring, every=10, max_age=hour) is None
        assert checkpoint_if_due(session, rt.keyring, every=10) is None
        # Old enough: a quiet deployment's tail still gets signed.
        aged = checkpoint_if_due(session, rt.keyring, every=10, max_age=timedelta(0))
        assert aged is not None and aged.seq > first.seq
    with transaction(rt.sessions) as session:
        # Nothing new since the last checkpoint: nothing to sign, whatever the age.
        assert checkpoint_if_due(session, rt.keyring, every=1, max_age=timedelta(0)) is None
    append(rt, 10)
    with transaction(rt.sessions) as session:
        assert checkpoint_if_due(session, rt.keyring, every=10) is not None
