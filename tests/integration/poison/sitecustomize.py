"""Test-only fault injection for RELIABILITY.md Q3, loaded by worker processes whose
``PYTHONPATH`` starts with this folder (never by the service itself).

With ``TEST_POISON_MARKER`` set, a screening whose image bytes contain the marker SIGKILLs its
own process, the way a decoder crash or the kernel's OOM killer would.
"""

import os

_marker = os.environ.get("TEST_POISON_MARKER")
if _marker:
    import signal

    from moderation.matching import screening

    _original = screening.Screener.screen_bytes

    def _screen_bytes(self, items, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(_marker.encode() in item for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return _original(self, items, *args, **kwargs)

    screening.Screener.screen_bytes = _screen_bytes  # type: ignore[method-assign]
