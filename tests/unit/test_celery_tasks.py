"""Every task beat schedules or a sender routes is defined by the worker (workers.tasks).

A merge once dropped the holds, console-job, canary and drift task definitions while beat kept
sending them: the messages would sit unconsumed (or fail as unregistered) with nothing noticing.
"""

from __future__ import annotations

from moderation.config import load_settings


def test_every_routed_and_scheduled_task_is_registered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import workers.tasks as tasks
    from workers.celery_app import ROUTES, _beat_schedule

    registered = set(tasks.app.tasks)
    assert set(ROUTES) <= registered, sorted(set(ROUTES) - registered)
    scheduled = {
        entry["task"] for entry in _beat_schedule(load_settings(data_dir=tmp_path)).values()
    }
    assert scheduled <= registered, sorted(scheduled - registered)
