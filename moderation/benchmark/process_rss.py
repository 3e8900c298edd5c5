"""Resident memory of a process tree, read from Linux ``/proc`` (proc(5)).

``VmRSS`` (``/proc/<pid>/status``) of the process and of every descendant, found through
``/proc/<pid>/task/<tid>/children`` (each thread's children; Linux >= 3.5). The sum counts
pages shared between the processes (a forking server's copy-on-write pages) once per process,
so it is an upper bound of the tree's footprint, the figure ``ps`` and ``top`` add up too.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _vm_rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid`` in bytes; 0 for a process that is gone or has no user memory (a
    zombie, a kernel thread)."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            # "VmRSS:     1234 kB": proc(5) reports kibibytes whatever the unit says.
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (empty when it is gone)."""
    found: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first (a snapshot: processes come and go)."""
    seen: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.append(current)
        pending.extend(_children(current))
    return seen


def tree_rss_bytes(pid: int) -> int:
    """Summed ``VmRSS`` of ``pid`` and all its descendants, bytes (0 when ``pid`` is gone)."""
    return sum(_vm_rss_bytes(p) for p in tree_pids(pid))
