"""An exclusive lock on a run (or comparison) directory, held for the run's life.

The lock is a POSIX record lock (`fcntl.lockf`) on ``DIR/.lock``, which also names the holder (pid, host,
start time) for the error a second writer gets. The kernel drops the lock when its process dies, however it
dies, so the file of a killed run is recognised as stale and taken over; record locks are not inherited by
forked children (data-loader workers), so a dead run's workers do not keep it. Where the file system has no
locks (ENOLCK), the recorded pid decides: a holder on this host that no longer runs is stale.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path

from norga.storage import StorageError, storage_message

log = logging.getLogger("norga")

LOCK_FILE = ".lock"
_HELD: set[str] = set()  # directories this process holds: a second lock in one process would break the first


class RunLockedError(FileExistsError):
    """Another process (or another object of this one) writes into the directory."""


class RunLock:
    """Hold ``folder/.lock`` until `release` (or until this object is collected, or the process ends)."""

    def __init__(self, folder: str | Path, what: str = "run directory") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        key = str(self.folder.resolve())
        if key in _HELD:
            raise RunLockedError(f"{self.folder} is already open in this process: close the other run of this "
                                 f"{what} first")
        handle, previous = self._acquire(what)
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over the lock of %s in %s: that process no longer runs", _describe(previous), self.folder)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._handle = handle
        _HELD.add(key)
        self._finalizer = weakref.finalize(self, _unlock, handle, self.path, key)

    def _acquire(self, what: str):
        """Open and lock the lock file; retried when a releasing holder removed the file we locked meanwhile."""
        while True:
            try:
                handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's life
            except OSError as error:
                raise StorageError(storage_message(self.path, error)) from error
            previous = _read_holder(handle)
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP) or _alive_elsewhere(previous):
                    handle.close()
                    raise RunLockedError(f"{self.folder} is in use by {_describe(previous)}: two processes must not "
                                         f"write one {what}; wait for it to end (or stop it), or use another "
                                         "directory") from None
            if _same_file(handle, self.path):
                return handle, previous
            handle.close()

    def release(self) -> None:
        """Give the directory up: the lock file is removed, then the lock dropped."""
        self._finalizer()


def _unlock(handle, path: Path, key: str) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only directory after all: the kernel still drops the lock below
    handle.close()
    _HELD.discard(key)


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_elsewhere(holder: dict) -> bool:
    """Without kernel locks: is the recorded holder a live process (or one on another host, unknowable)?"""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
