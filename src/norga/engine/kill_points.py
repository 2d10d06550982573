"""A test hook for `tools/crash_probe.py`: ``NORGA_KILL_AT=EVENT:N`` makes the process SIGKILL itself at the
Nth EVENT (``write``: right after an atomic write's rename, ``tmp``: a temporary file written but not yet
renamed, ``phase``: a phase finished, before its checkpoint). ``NORGA_KILL_TRACE=FILE`` appends every event's
name to FILE (the probe counts the kill points of an uninterrupted run). Inert unless one of them is set."""

from __future__ import annotations

import os
import signal
from collections import Counter

_TARGET = os.environ.get("NORGA_KILL_AT", "")
_TRACE = os.environ.get("NORGA_KILL_TRACE", "")
_seen: Counter = Counter()


def kill_point(event: str) -> None:
    """Count `event`; at the configured count, die as a `kill -9` would (no cleanup, no flush)."""
    if not (_TARGET or _TRACE):
        return
    _seen[event] += 1
    if _TRACE:
        with open(_TRACE, "a") as trace:
            trace.write(event + "\n")
    if _TARGET == f"{event}:{_seen[event]}":
        os.kill(os.getpid(), signal.SIGKILL)
