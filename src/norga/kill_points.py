"""A test hook for `tools/crash_probe.py`: ``NORGA_KILL_AT=EVENT:N`` makes the process SIGKILL itself at the
Nth EVENT (``write``: right after an atomic write's rename, ``tmp``: a temporary file written but not yet
renamed, ``phase``: a phase finished, before its checkpoint). ``NORGA_KILL_TRACE=FILE`` appends every event
(name, count, what it concerns) to FILE: the probe lists the kill points of an uninterrupted run that way.
Inert unless one of them is set."""

from __future__ import annotations

import os
import signal
from collections import Counter

_TARGET, _TRACE = "", ""
_seen: Counter = Counter()


def configure() -> None:
    """Read the two variables (again: a probe that forks its runs sets them in each child) and reset the counts."""
    global _TARGET, _TRACE
    _TARGET, _TRACE = os.environ.get("NORGA_KILL_AT", ""), os.environ.get("NORGA_KILL_TRACE", "")
    _seen.clear()


def kill_point(event: str, detail: str = "") -> None:
    """Count `event` (`detail`, e.g. the file written, goes into the trace); at the configured count, die as a
    `kill -9` would (no cleanup, no flush)."""
    if not (_TARGET or _TRACE):
        return
    _seen[event] += 1
    if _TRACE:
        with open(_TRACE, "a") as trace:
            trace.write(f"{event}:{_seen[event]} {detail}\n")
    if _TARGET == f"{event}:{_seen[event]}":
        os.kill(os.getpid(), signal.SIGKILL)


configure()
