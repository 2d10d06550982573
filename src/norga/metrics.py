"""Accuracy matrices and the continual-learning metrics derived from them (NORGA_SPEC §4).

``acc[i, t]`` is the top-1 accuracy (%) on the test set of task i after training task t. Each cell keeps
its correct / total counts, so both the official task-averaged final accuracy and a sample-weighted
one come from the same record. Every metric takes ``upto`` (0-based last finished task), giving the
official "till task t" values after every task.

A *joint* matrix (the joint-training upper bound) has one column: every task's test set after a single
training step on the union of all tasks. Its final accuracies are defined; CA, forgetting and backward
transfer are not (there is no sequence of steps) and are returned as None rather than as numbers.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from norga.storage import atomic_write


class AccuracyMatrix:
    """T×T counts of correct and total test samples per (evaluated task, after task); T×1 when `joint`."""

    def __init__(self, num_tasks: int, joint: bool = False) -> None:
        if num_tasks <= 0:
            raise ValueError(f"an accuracy matrix needs at least one task, got {num_tasks}")
        self.joint = joint
        shape = (num_tasks, 1 if joint else num_tasks)
        self.correct = np.zeros(shape, dtype=np.int64)
        self.total = np.zeros(shape, dtype=np.int64)

    @property
    def num_tasks(self) -> int:
        return self.correct.shape[0]

    @property
    def num_steps(self) -> int:
        """Training steps (columns): one per task, or one for a joint run."""
        return self.correct.shape[1]

    def tested(self, upto: int) -> int:
        """How many tasks (rows 0..n-1) are tested after step `upto`: the seen ones, or all in a joint run."""
        return self.num_tasks if self.joint else upto + 1

    def is_empty(self) -> bool:
        """True when no cell was ever recorded (e.g. task identity of a method that infers no task)."""
        return not self.total.any()

    def update(self, task_evaluated: int, after_task: int, correct: int, total: int) -> None:
        """Record the test result of `task_evaluated` after training `after_task`."""
        if not (0 <= after_task < self.num_steps and 0 <= task_evaluated < self.tested(after_task)):
            raise IndexError(f"cell ({task_evaluated}, {after_task}) is outside the seen part of a {self.num_tasks}-task matrix")
        if not 0 <= correct <= total or total == 0:
            raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
        self.correct[task_evaluated, after_task] = correct
        self.total[task_evaluated, after_task] = total

    def accuracies(self) -> np.ndarray:
        """acc[i, t] in percent; cells never evaluated are 0 (as the official zero-initialised matrix)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, 100.0 * self.correct / np.maximum(self.total, 1), 0.0)

    def final_average_accuracy(self, upto: int | None = None) -> float:
        """FA (official): unweighted mean over tasks i <= upto of acc[i, upto]."""
        upto = self._upto(upto)
        return float(self.accuracies()[: self.tested(upto), upto].mean())

    def sample_weighted_final_accuracy(self, upto: int | None = None) -> float:
        """Correct / total over all test samples of tasks <= upto, after task `upto`."""
        upto = self._upto(upto)
        rows = self.tested(upto)
        return float(100.0 * self.correct[:rows, upto].sum() / max(self.total[:rows, upto].sum(), 1))

    def cumulative_average_accuracy(self, upto: int | None = None) -> float | None:
        """CA (official): mean over t <= upto of the average accuracy on tasks <= t after task t (joint: None)."""
        if self.joint:
            return None
        upto = self._upto(upto)
        acc = self.accuracies()
        return float(np.mean([acc[: t + 1, t].mean() for t in range(upto + 1)]))

    def forgetting(self, upto: int | None = None) -> float | None:
        """FFM (official): mean over i < upto of max over ALL columns <= upto of acc[i] minus acc[i, upto].

        None for a joint matrix: with one training step nothing can be forgotten or measured as forgotten.
        """
        if self.joint:
            return None
        upto = self._upto(upto)
        if upto == 0:
            return 0.0
        acc = self.accuracies()[:, : upto + 1]
        return float(np.mean(acc[:upto].max(axis=1) - acc[:upto, upto]))

    def backward_transfer(self, upto: int | None = None) -> float | None:
        """Mean over i < upto of acc[i, upto] - acc[i, i] (joint: None)."""
        if self.joint:
            return None
        upto = self._upto(upto)
        if upto == 0:
            return 0.0
        acc = self.accuracies()
        return float(np.mean([acc[i, upto] - acc[i, i] for i in range(upto)]))

    def _upto(self, upto: int | None) -> int:
        upto = self.num_steps - 1 if upto is None else upto
        if not 0 <= upto < self.num_steps:
            raise IndexError(f"upto must be a task index in [0, {self.num_steps}), got {upto}")
        return upto

    # ------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        """Counts per cell, and accuracies (%) for reading, None (null) where a cell was never measured."""
        accuracy = np.round(self.accuracies(), 6).tolist()
        measured = self.total > 0
        return {"correct": self.correct.tolist(), "total": self.total.tolist(),
                "accuracy": [[value if seen else None for value, seen in zip(row, seen_row)]
                             for row, seen_row in zip(accuracy, measured.tolist())],
                "joint": self.joint}

    @classmethod
    def from_dict(cls, data: dict) -> AccuracyMatrix:
        matrix = cls(len(data["correct"]), joint=bool(data.get("joint", False)))
        matrix.correct[:] = np.asarray(data["correct"], dtype=np.int64)
        matrix.total[:] = np.asarray(data["total"], dtype=np.int64)
        return matrix

    def to_csv(self, path: str | Path) -> None:
        """Accuracies (%) with a header row of "after task" columns and the evaluated task in column 0; a cell
        never measured is left empty (not 0)."""
        acc = self.accuracies()
        columns = ["after_joint_training"] if self.joint else [f"after_task_{t + 1}" for t in range(self.num_steps)]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["test_task", *columns])
                for i in range(self.num_tasks):
                    writer.writerow([i + 1] + [f"{acc[i, t]:.4f}" if self.total[i, t] else ""
                                               for t in range(self.num_steps)])

        atomic_write(path, write)


@dataclass
class MethodResult:
    """A finished run as a comparison reports it, read back from its results.json."""

    label: str
    method: str
    joint: bool
    metrics: dict[str, float | None]
    task_identity_accuracy: float | None
    task_incremental_accuracy: float | None  # each image's true task given; None in a joint run
    matrix: AccuracyMatrix
    run_dir: Path
    status: str  # ran | resumed (time counts this invocation only) | finished earlier
    wall_seconds: float | None
    gates: list[dict] = field(default_factory=list)  # a gated method's learned alpha and tau per prompted block
    curve: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.curve = [self.matrix.final_average_accuracy(t) for t in range(self.matrix.num_steps)]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "joint": self.joint, "metrics": self.metrics,
                "task_identity_accuracy": self.task_identity_accuracy,
                "task_incremental_accuracy": self.task_incremental_accuracy, "wall_seconds": self.wall_seconds,
                "status": self.status, "run_dir": str(self.run_dir), "average_accuracy_after_each_step": self.curve}
