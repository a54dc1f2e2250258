"""Per-phase CPU and wall time of one forked flow run (off unless asked for).

Why: a warm start is only as fast as what the forked child still does for every run, and
only the child can measure that honestly (its CPU clock starts at zero at ``fork``; every
thread it starts counts).  With ``VISITFLOW_CHILD_PHASES=<file>`` in the worker's
environment, each child appends one JSON line to that file when it exits::

    {"pid": 123, "marks": [["fork", wall, cpu, modules], ["env", ...], ...], "imported": [...]}

``wall`` is ``time.perf_counter()`` (CLOCK_MONOTONIC: comparable across the zygote, the child
and the flow body), ``cpu`` the child's ``time.process_time()``, ``modules`` the size of
``sys.modules`` (a phase that imports shows up there); ``imported`` names the modules the
child imported itself (what the zygote could have imported once).  The first mark, ``request``, is taken
in the zygote just before ``fork``.  ``benchmarks/child_startup.py`` reads the file.
Unset, every call here is a no-op.
"""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ['ENV', 'start', 'mark', 'write']

ENV = "VISITFLOW_CHILD_PHASES"

_path: str | None = None
_marks: list[tuple[str, float, float, int]] = []
_at_fork: frozenset[str] = frozenset()


def start(path: str | None, requested_at: float | None = None) -> None:
    """In the child right after ``fork``: begin a fresh record (``path`` None: stay off)."""
    global _path, _at_fork
    _path = path or None
    _marks.clear()
    _at_fork = frozenset(sys.modules) if _path else frozenset()
    if _path and requested_at is not None:
        _marks.append(("request", requested_at, 0.0, len(sys.modules)))
    mark("fork")


def mark(name: str) -> None:
    if _path:
        _marks.append((name, time.perf_counter(), time.process_time(), len(sys.modules)))


def write() -> None:
    """Append this child's record (one ``write`` of one line to an ``O_APPEND`` file: whole
    lines even when children exit together)."""
    if not _path:
        return
    line = (json.dumps({"pid": os.getpid(), "marks": [[n, round(w, 6), round(c, 6), m] for n, w, c, m in _marks],
                        "imported": sorted(set(sys.modules) - _at_fork)}) + "\n").encode()
    try:
        fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass
