"""Atomic writes and safe loading of checkpoints and result files (the one I/O leaf every layer writes through).

Every file is written to a temporary file beside its target (``.NAME.RANDOM.tmp``, created with mode
0666 minus the umask, like any other file) and renamed over it, so a reader sees the old file or the new
one, never a part. A write that fails (disk full, read-only or unwritable directory) becomes a
`StorageError` naming the file; temporaries left by a killed process are removed by `remove_temporaries`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from norga.kill_points import kill_point

#: Temporary files of `atomic_write` (and of the `tempfile.mkstemp` names earlier versions used).
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8,32}\.tmp$")


class StorageError(OSError):
    """A file that cannot be written: the message names the file, the cause and what to do."""


class CheckpointError(ValueError):
    """A checkpoint (or a run directory's state) that cannot be used; the message names the file and the fix."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside `path`, then rename it over `path`.

    A failure (or a crash) leaves the previous file intact; a failure also leaves no partial file behind.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask decides the mode
        write(tmp)
        _sync(tmp)
        kill_point("tmp", str(path))
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = _os_error_of(error)
        if cause is not None and not isinstance(error, StorageError):
            storage = StorageError(storage_message(path, cause))
            storage.errno = cause.errno
            raise storage from error
        raise
    kill_point("write", str(path))


def _sync(path: Path) -> None:
    """Flush `path` to the device, so that the rename that follows never exposes an empty file after a power cut."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind `error` (torch's writer reports a failed write as a RuntimeError whose context is it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def storage_message(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent)
        return (f"cannot write {path}: no space left on the device ({free} free); free some space or point "
                "output_dir elsewhere")
    if error.errno == errno.EROFS:
        return f"cannot write {path}: the file system is read-only; write the run somewhere writable"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; make {path.parent} writable or write the run elsewhere"
    if error.errno == errno.EFBIG:
        return f"cannot write {path}: the file exceeds the size limit of this system (ulimit -f)"
    return f"cannot write {path}: {error.strerror or error}"


def _free_bytes(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` and its subfolders; returns them.

    Only call this while no other process writes into `folder` (a run directory's lock is held).
    """
    removed = []
    for candidate in Path(folder).rglob(".*.tmp"):
        if candidate.is_file() and TEMPORARY.match(candidate.name):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """`torch.save` atomically; `state` must hold only tensors and plain Python values."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a Python file: a failed write keeps its errno (see `_os_error_of`)
            torch.save(state, handle)

    atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a norga "
                              f"checkpoint ({_reason(error)}); restore it, or start the run again") from error


def _reason(error: Exception) -> str:
    """The part of torch's loading error that says what is wrong with the file (not its advice to unpickle it)."""
    text = " ".join(str(error).split())
    unpickler = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text)
    if unpickler:
        return f"weights-only unpickler: {unpickler.group(1).strip()}"
    return text.split(". ")[0] if text else type(error).__name__


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_json(path: str | Path) -> Any:
    """Read a JSON file written by `write_json`; a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"cannot read {path}: not valid JSON ({error}); restore or delete it") from error


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
