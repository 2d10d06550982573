"""A run is a directory: config, environment, state checkpoints, results, matrices, log and plots."""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch

from norga import __version__
from norga.config import RunConfig
from norga.engine.checkpoint import load_checkpoint, save_checkpoint, write_json
from norga.metrics import AccuracyMatrix

if TYPE_CHECKING:
    from norga.methods.base import ContinualMethod

STATE = "state.pt"
HEAVY_STATE = "state_heavy.pt"


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
    """Owns every file of a run; all writes are atomic.

    ``write=False`` gives a read-only view (the other processes of a distributed run): it reads the state to
    resume, and every write is skipped.
    """

    def __init__(self, path: Path, create: bool = True, write: bool = True) -> None:
        self.path = Path(path)
        self.writable = write
        if not write:
            return
        if create:
            if self.path.exists() and any(self.path.iterdir()):
                raise FileExistsError(
                    f"run directory {self.path} already exists and is not empty: resume it with "
                    f"`norga run --resume {self.path}` or choose another name"
                )
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / STATE).is_file():
            raise FileNotFoundError(f"{self.path} holds no {STATE}: not a run directory that can be resumed")
        self._attach_log()

    def _attach_log(self) -> None:
        logger = logging.getLogger("norga")
        logger.setLevel(logging.INFO)
        log_file = str((self.path / "log.txt").resolve())
        for handler in [h for h in logger.handlers if getattr(h, "norga_run_log", False)]:
            if handler.baseFilename != log_file:  # one run at a time: `norga compare` runs several in one process
                logger.removeHandler(handler)
                handler.close()
        if not any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):
            handler = logging.FileHandler(log_file)
            handler.norga_run_log = True
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)

    # ------------------------------------------------------------- records
    def write_config(self, config: RunConfig) -> None:
        if not self.writable:
            return
        from norga.config_io import dump_config

        dump_config(config, self.path / "config.yaml")

    def write_environment(self, extra: dict[str, Any]) -> None:
        if not self.writable:
            return
        write_json(
            {
                "norga": __version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "git_sha": _git_sha(),
                **extra,
            },
            self.path / "environment.json",
        )

    # -------------------------------------------------------------- state
    def save_state(self, state: dict[str, Any], heavy: dict[str, Any] | None = None) -> None:
        """Heavy parts (class statistics) are written only when given; the light state every time."""
        if not self.writable:
            return
        if heavy is not None:
            save_checkpoint(heavy, self.path / HEAVY_STATE)
        save_checkpoint(state, self.path / STATE)

    def load_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        heavy_path = self.path / HEAVY_STATE
        heavy = load_checkpoint(heavy_path) if heavy_path.is_file() else {}
        return load_checkpoint(self.path / STATE), heavy

    def save_task_checkpoint(self, task: int, state: dict[str, Any], heavy: dict[str, Any]) -> None:
        if not self.writable:
            return
        save_checkpoint({**state, **heavy}, self.path / "checkpoints" / f"task{task + 1}.pt")

    # ------------------------------------------------------------ results
    def write_results(self, config: RunConfig, matrices: dict[str, AccuracyMatrix], upto: int,
                      method: ContinualMethod | None = None) -> dict[str, Any]:
        """results.json, the matrices as CSV and the plots (read-only view: nothing is written).

        The record holds the method's own resolved settings and what it adds (`ContinualMethod.compat`,
        `run_record`), and nothing of another method's.
        """
        accuracy, identity = matrices["accuracy"], matrices.get("task_identity")
        results = {
            "method": config.method,
            "settings": dataclasses.asdict(config.settings),
            "joint": accuracy.joint,
            "tasks_finished": accuracy.tested(upto),
            "complete": upto + 1 == accuracy.num_steps,
            "metrics": metrics_of(accuracy, upto),
            # null where the method infers no task (e.g. linear_probe, ncm) or in a joint run (trivial)
            "task_identity_accuracy": None if identity is None else identity.final_average_accuracy(upto),
            "compat": {
                "normalization": config.data.normalization,
                "fiveds_transform_carryover": config.data.fiveds_transform_carryover,
                "mask_final_logits": config.eval.mask_final_logits,
                "test_batch_size": config.eval.batch_size,
                **(method.compat() if method is not None else {}),
            },
            **(method.run_record() if method is not None else {}),
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


def _git_sha() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None
