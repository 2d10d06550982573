"""A run is a directory: config, environment, state checkpoints, results, matrices, log and plots."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import subprocess
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch

from norga import __version__
from norga.config import RunConfig
from norga.engine.run_lock import LOCK_FILE, RunLock
from norga.metrics import AccuracyMatrix
from norga.storage import (
    CheckpointError,
    StorageError,
    load_checkpoint,
    load_json,
    remove_temporaries,
    save_checkpoint,
    storage_message,
    write_json,
)

if TYPE_CHECKING:
    from norga.methods.base import ContinualMethod

STATE = "state.pt"
HEAVY_STATE = "state_heavy.pt"
CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
LOG = "log.txt"
#: Version of the layout of state.pt / state_heavy.pt / checkpoints/taskK.pt; a resume refuses any other.
STATE_FORMAT = 2


def _pending_heavy(generation: int | str) -> str:
    return f"state_heavy.pending-{generation}.pt"


def run_stamp() -> str:
    """The time part of a default run name: sortable, to the millisecond, plus this process's id (so runs started
    together never share a name), e.g. ``20261124-130000.123-4567``."""
    now = time.time()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1000):03d}-{os.getpid()}"


#: Why a joint run (one training step on all tasks) reports some metrics as null.
JOINT_NOTE = ("joint training: one step on the union of all tasks, so cumulative average accuracy, forgetting and "
              "backward transfer are undefined (null), and task identity is trivial (one task), so not reported")


def metrics_of(matrix: AccuracyMatrix, upto: int) -> dict[str, float | None]:
    """The reported metrics after task `upto` (0-based), derived from the stored matrix (None: undefined)."""
    return {
        "final_average_accuracy": matrix.final_average_accuracy(upto),
        "sample_weighted_final_accuracy": matrix.sample_weighted_final_accuracy(upto),
        "cumulative_average_accuracy": matrix.cumulative_average_accuracy(upto),
        "forgetting": matrix.forgetting(upto),
        "backward_transfer": matrix.backward_transfer(upto),
    }


class RunDirectory:
    """Owns every file of a run; all writes are atomic, and one process writes it at a time (`RunLock`).

    ``create=True`` makes a new run directory (a missing or empty folder, or one that holds nothing but the log
    and lock a run killed at its start left), ``create=False`` opens one to
    resume: it is locked, temporary files a killed writer left are removed, and the class statistics of an
    interrupted checkpoint are settled (see `save_state`). ``write=False`` gives a read-only view (the other
    processes of a distributed run): it reads the state to resume, and every write is skipped.
    """

    def __init__(self, path: Path, create: bool = True, write: bool = True) -> None:
        self.path = Path(path)
        self.writable = write
        self.lock: RunLock | None = None
        self.run_id: str | None = None
        self.config_hash: str | None = None  # set by the engine: the identity of the config (resume_changes)
        self.heavy_generation = 0  # how many times the class statistics were saved; state.pt names the current one
        self.made_folder = self.made_log = False  # what `_create` made (and so `discard` may remove)
        if not write:
            self.run_id = self.read_environment().get("run_id")
            return
        if create:
            self._create()
        else:
            self._open()
        self._attach_log()

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True)
            self.made_folder = True
        except FileExistsError:
            if not self.path.is_dir():
                raise FileExistsError(f"{self.path} exists and is not a directory: choose another run directory") from None
        except OSError as error:
            raise StorageError(storage_message(self.path, error)) from error
        self.lock = RunLock(self.path)
        remove_temporaries(self.path)  # of a run killed before it wrote anything else
        if any(entry.name not in (LOCK_FILE, LOG) for entry in self.path.iterdir()):  # checked holding the lock
            self.close()
            raise FileExistsError(f"run directory {self.path} already exists and is not empty: resume it with "
                                  f"`norga run --resume {self.path}` or choose another name")
        self.made_log = not (self.path / LOG).exists()
        self.run_id = uuid.uuid4().hex

    def _open(self) -> None:
        if not self.path.is_dir() or not any((self.path / name).is_file() for name in (STATE, CONFIG)):
            raise FileNotFoundError(f"{self.path} is not a run directory that can be resumed (no {STATE} or {CONFIG}): "
                                    "give the folder `norga run` created, e.g. runs/NAME-YYYYMMDD-HHMMSS...")
        self.lock = RunLock(self.path)
        try:
            removed = remove_temporaries(self.path)
            self.run_id = self.read_environment().get("run_id")
            self._settle_heavy_state()
        except BaseException:
            self.close()
            raise
        if removed:
            logging.getLogger("norga").info("removed %d temporary files an interrupted write left", len(removed))

    def close(self) -> None:
        """Release the directory (the lock); the run's files stay as they are."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> None:
        """Undo a new run that failed before it wrote anything but its log: release the directory, close the log,
        and remove the log and the folder if this object made them (a folder the caller gave stays as it was)."""
        self.close()
        log_file = str((self.path / LOG).resolve())
        _close_run_logs(lambda name: name == log_file)
        if not self.writable or any(entry.name != LOG for entry in self.path.iterdir()):
            return
        if self.made_log:
            (self.path / LOG).unlink(missing_ok=True)
        if self.made_folder and not any(self.path.iterdir()):
            self.path.rmdir()

    def _attach_log(self) -> None:
        logger = logging.getLogger("norga")
        logger.setLevel(logging.INFO)
        log_file = str((self.path / LOG).resolve())
        _close_run_logs(lambda name: name != log_file)  # one run at a time: `norga compare` runs several in one process
        if not any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):
            handler = _BestEffortFileHandler(log_file)
            handler.norga_run_log = True
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)

    # ------------------------------------------------------------- records
    def write_config(self, config: RunConfig) -> None:
        if not self.writable:
            return
        from norga.config_io import dump_config

        dump_config(config, self.path / CONFIG)

    def read_config(self) -> RunConfig | None:
        """The stored config.yaml (None when there is none, e.g. an engine given a bare directory)."""
        from norga.config_io import load_config

        return load_config(self.path / CONFIG) if (self.path / CONFIG).is_file() else None

    def write_environment(self, extra: dict[str, Any]) -> None:
        if not self.writable:
            return
        write_json(
            {
                "norga": __version__,
                "run_id": self.run_id,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "git_sha": _git_sha(),
                **extra,
            },
            self.path / ENVIRONMENT,
        )

    def read_environment(self) -> dict[str, Any]:
        path = self.path / ENVIRONMENT
        return load_json(path) if path.is_file() else {}

    def check_benchmark(self, records: dict[str, Any]) -> None:
        """Refuse to resume on other data: the benchmark's split hash must be the one recorded at the start."""
        recorded = self.read_environment().get("benchmark", {}).get("split_sha256")
        now = records.get("benchmark", {}).get("split_sha256")
        if recorded and now and recorded != now:
            raise CheckpointError(f"the data changed since {self.path} started: its benchmark split (classes and "
                                  f"images per task) hashes to {now[:12]}, the run recorded {recorded[:12]}; restore "
                                  "the data the run started with, or start a new run")

    def record_resume_changes(self, config: RunConfig, changes: dict[str, tuple[Any, Any]], position: dict) -> None:
        """A resume changed settings: config.yaml becomes the new config, environment.json lists the change."""
        if not self.writable:
            return
        environment = self.read_environment()
        environment.setdefault("resume_changes", []).append(
            {"at": position, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}})
        write_json(environment, self.path / ENVIRONMENT)
        self.write_config(config)

    # -------------------------------------------------------------- state
    def _record(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "norga": __version__, "run_id": self.run_id, "config_hash": self.config_hash,
                "heavy_generation": self.heavy_generation}

    def save_state(self, state: dict[str, Any], heavy: dict[str, Any] | None = None) -> None:
        """Save the light state; heavy parts (class statistics) only when given.

        The heavy file is written first under a pending name that carries its generation, state.pt (which names
        that generation) next, and the pending file then becomes state_heavy.pt: a crash anywhere leaves a
        state.pt and the class statistics that belong to it (`_settle_heavy_state` finishes the rename).
        """
        if not self.writable:
            return
        pending = None
        if heavy is not None:
            self.heavy_generation += 1
            pending = self.path / _pending_heavy(self.heavy_generation)
            save_checkpoint({"generation": self.heavy_generation, "state": heavy}, pending)
        save_checkpoint({**state, "run": self._record()}, self.path / STATE)
        if pending is not None:
            os.replace(pending, self.path / HEAVY_STATE)

    def _settle_heavy_state(self) -> None:
        """Finish (or drop) a heavy-state write that a crash interrupted, as state.pt says."""
        pending = sorted(self.path.glob(_pending_heavy("*")))
        if not pending:
            return
        generation = self._read_record(load_checkpoint(self.path / STATE))["heavy_generation"] if (
            self.path / STATE).is_file() else 0
        for path in pending:
            if path.name == _pending_heavy(generation):
                os.replace(path, self.path / HEAVY_STATE)
            else:
                path.unlink()

    def has_state(self) -> bool:
        return (self.path / STATE).is_file()

    def load_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The light state (with its ``run`` record) and the class statistics that belong to it."""
        state = load_checkpoint(self.path / STATE)
        record = self._read_record(state)
        if self.run_id is None:
            self.run_id = record["run_id"]
        elif record["run_id"] != self.run_id:
            raise CheckpointError(f"{self.path / STATE} belongs to another run (run id {record['run_id'][:12]}, this "
                                  f"directory's {ENVIRONMENT} says {self.run_id[:12]}): restore this run's own "
                                  f"{STATE} or start a new run")
        self.heavy_generation = record["heavy_generation"]
        return state, self._load_heavy(self.heavy_generation)

    def _read_record(self, state: dict[str, Any]) -> dict[str, Any]:
        record = state.get("run") if isinstance(state, dict) else None
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            found = record.get("format") if isinstance(record, dict) else "none"
            raise CheckpointError(f"{self.path / STATE} is not a run state of norga's format {STATE_FORMAT} (found "
                                  f"{found}): it was written by another norga version or is not the state of a run; "
                                  "start a new run")
        return record

    def _load_heavy(self, generation: int) -> dict[str, Any]:
        if generation == 0:
            return {}
        path = self.path / HEAVY_STATE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {STATE} needs the class statistics it holds; restore it, or "
                                  "start the run again")
        saved = load_checkpoint(path)
        if not isinstance(saved, dict) or saved.get("generation") != generation:
            raise CheckpointError(f"{path} does not belong to {STATE} (class statistics of save "
                                  f"{saved.get('generation') if isinstance(saved, dict) else '?'}, the state needs "
                                  f"save {generation}): restore the pair that was saved together, or start the run again")
        return saved["state"]

    def task_checkpoint(self, task: int) -> Path:
        return self.path / "checkpoints" / f"task{task + 1}.pt"

    def save_task_checkpoint(self, task: int, state: dict[str, Any], heavy: dict[str, Any]) -> None:
        if not self.writable:
            return
        save_checkpoint({**state, **heavy, "run": self._record()}, self.task_checkpoint(task))

    def task_checkpoint_intact(self, task: int) -> bool:
        """Whether checkpoints/taskK.pt exists and is a whole archive (its index, written last, is readable)."""
        try:
            with zipfile.ZipFile(self.task_checkpoint(task)):
                return True
        except (OSError, zipfile.BadZipFile):
            return False

    # ------------------------------------------------------------ results
    def write_results(self, config: RunConfig, matrices: dict[str, AccuracyMatrix], upto: int,
                      method: ContinualMethod | None = None) -> dict[str, Any]:
        """results.json, the matrices as CSV and the plots (read-only view: nothing is written).

        The record holds the method's own resolved settings and what it adds (`ContinualMethod.compat`,
        `run_record`), and nothing of another method's.
        """
        accuracy, identity, within_task = (matrices["accuracy"], matrices.get("task_identity"),
                                           matrices.get("task_incremental"))
        results = {
            "method": config.method,
            "settings": dataclasses.asdict(config.settings),
            "joint": accuracy.joint,
            "tasks_finished": accuracy.tested(upto),
            "complete": upto + 1 == accuracy.num_steps,
            "metrics": metrics_of(accuracy, upto),
            # null where the method infers no task (e.g. linear_probe, ncm) or in a joint run (trivial)
            "task_identity_accuracy": None if identity is None else identity.final_average_accuracy(upto),
            # each image's true task given (its prompts, its classes); null in a joint run
            "task_incremental_accuracy": None if within_task is None else within_task.final_average_accuracy(upto),
            "compat": {
                "normalization": config.data.normalization,
                "fiveds_transform_carryover": config.data.fiveds_transform_carryover,
                "mask_final_logits": config.eval.mask_final_logits,
                "test_batch_size": config.eval.batch_size,
                **(method.compat() if method is not None else {}),
            },
            **({"capabilities": method.capabilities.to_dict(), **method.run_record()} if method is not None else {}),
            "matrices": {name: matrix.to_dict() for name, matrix in matrices.items()},
        }
        if accuracy.joint:
            results["note"] = JOINT_NOTE
        if not self.writable:
            return results
        write_json(results, self.path / "results.json")
        for name, matrix in matrices.items():
            matrix.to_csv(self.path / f"{name}_matrix.csv")
        from norga.report import plot_run, plot_title  # matplotlib is imported only when plotting

        plot_run(accuracy, self.path, upto, title=plot_title(config))
        return results


def _close_run_logs(chosen: Callable[[str], bool]) -> None:
    """Remove from the norga logger, and close, the run-log handlers whose file path `chosen` picks."""
    logger = logging.getLogger("norga")
    for handler in [h for h in logger.handlers if getattr(h, "norga_run_log", False) and chosen(h.baseFilename)]:
        logger.removeHandler(handler)
        handler.close()


class _BestEffortFileHandler(logging.FileHandler):
    """log.txt: a line that cannot be written (a full disk) is dropped; the checkpoint write reports the disk."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def _git_sha() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None
