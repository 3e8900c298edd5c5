"""Memory of a process tree from Linux's ``/proc``: a web tier (gunicorn master and workers),
a Celery worker and its pool.

``VmRSS`` (``/proc/<pid>/status``, proc(5)) counts every resident page a process maps, so a
sum over forked processes counts pages they share (the code and data the master loaded before
forking) once per process; ``Pss`` (``/proc/<pid>/smaps_rollup``, Linux >= 4.14) divides each
shared page among its sharers, so its sum is the tree's real footprint. A process that exits
while being read counts 0. Linux only: elsewhere every figure is 0 and there are no children.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _field_kib(path: Path, name: str) -> int:
    """The ``name:`` line of a ``/proc`` file, in KiB (0 when the file or line is missing)."""
    try:
        text = path.read_text()
    except OSError:  # the process exited, or another user's and unreadable
        return 0
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from each process's parent
    in ``/proc/<pid>/stat`` (field 4, proc(5)); breadth first."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        below = sorted(children.get(queue.pop(0), []))
        found += below
        queue += below
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process in bytes (``VmRSS``), 0 once it has exited."""
    return _field_kib(PROC / str(pid) / "status", "VmRSS") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process in bytes (``Pss``: shared pages divided among
    the processes sharing them), 0 once it has exited."""
    return _field_kib(PROC / str(pid) / "smaps_rollup", "Pss") * 1024


def tree_rss_bytes(pid: int) -> int:
    """Sum of ``VmRSS`` over ``pid`` and its descendants, in bytes (shared pages counted once
    per process: an upper bound of the tree's memory)."""
    return sum(rss_bytes(p) for p in [pid, *descendants(pid)])


def tree_pss_bytes(pid: int) -> int:
    """Sum of ``Pss`` over ``pid`` and its descendants, in bytes (the tree's footprint)."""
    return sum(pss_bytes(p) for p in [pid, *descendants(pid)])


def mapped_files(pid: int) -> set[str]:
    """Paths of the files ``pid`` maps (``/proc/<pid>/maps``: shared libraries, mapped data),
    empty once it has exited."""
    try:
        text = (PROC / str(pid) / "maps").read_text()
    except OSError:
        return set()
    paths = set()
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            paths.add(parts[5].removesuffix(" (deleted)"))
    return paths
