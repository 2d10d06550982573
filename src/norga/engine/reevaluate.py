"""Re-evaluate a finished (or interrupted) run from one of its task checkpoints, without touching its results.

`reevaluate` loads ``checkpoints/taskK.pt`` into the method the run's config.yaml describes and evaluates every
test task seen after task K: class-incremental accuracy with the prompts `slots` names, task-incremental
accuracy (each image's true task given) and, in ``predicted`` mode, task-identity accuracy. Only settings that
do not change what was trained may differ from the run's (`EVALUATION_SAFE`): the evaluation batch size, the
prefix layout, the official batch-wise vote, the data's location, the device and precision. The record goes
to ``evaluations/`` in the run directory (JSON and CSV, atomically); results.json and the matrices stay as
the run wrote them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from norga.config import ConfigError, RunConfig
from norga.config_io import load_config
from norga.engine.evaluation import evaluate_seen_tasks
from norga.engine.joint import training_schedule
from norga.engine.resume_changes import config_differences, identity_hash
from norga.engine.run_dir import CONFIG, ENVIRONMENT, run_stamp
from norga.methods import method_class
from norga.metrics import AccuracyMatrix
from norga.runtime.context import BuiltRun, RunContext
from norga.runtime.distributed import SINGLE_PROCESS, Distributed
from norga.runtime.seeding import seed_everything
from norga.storage import CheckpointError, load_checkpoint, write_json, write_text

#: Dotted-key patterns an evaluation may set differently from the run: they change how it is evaluated, not
#: what was trained.
EVALUATION_SAFE = ("eval.*", "*.prefix_layout", "*.batchwise_prompt", "*.task_identity_counts",
                   "*.cache_prompted_features", "data.root", "data.workers", "data.download", "device", "amp",
                   "compile", "attention_impl", "cache_frozen_features", "cache_features_on_disk")
EVALUATIONS = "evaluations"
COLUMNS = {"accuracy": "class-IL", "task_incremental": "task-IL", "task_identity": "task-id"}


@dataclass
class Evaluation:
    """What one re-evaluation measured: per seen test task, each matrix's accuracy (percent) after `task`."""

    run_dir: Path
    task: int  # 0-based: the checkpoint after this task
    num_tasks: int
    slots: str
    changes: dict[str, tuple[Any, Any]]
    batch_size: int
    images: list[int] = field(default_factory=list)
    accuracies: dict[str, list[float]] = field(default_factory=dict)  # matrix name -> per seen test task
    recorded: dict[str, list[float]] = field(default_factory=dict)  # the run's own column, same names

    def mean(self, name: str) -> float:
        values = self.accuracies[name]
        return sum(values) / len(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "checkpoint": f"checkpoints/task{self.task + 1}.pt",
            "after_task": self.task + 1, "num_tasks": self.num_tasks, "slots": self.slots,
            "eval_batch_size": self.batch_size,
            "changed_settings": {key: {"run": old, "evaluation": new} for key, (old, new) in self.changes.items()},
            "per_task": [{"task": index + 1, "images": self.images[index],
                          **{name: values[index] for name, values in self.accuracies.items()}}
                         for index in range(len(self.images))],
            "average": {name: self.mean(name) for name in self.accuracies},
            "recorded_by_the_run": self.recorded,
        }

    def to_csv(self) -> str:
        names = list(self.accuracies)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["task", "images", *names])
        for index, images in enumerate(self.images):
            writer.writerow([index + 1, images, *(f"{self.accuracies[name][index]:.4f}" for name in names)])
        writer.writerow(["mean", sum(self.images), *(f"{self.mean(name):.4f}" for name in names)])
        return buffer.getvalue()


def evaluation_config(run_dir: Path, overrides: list[str]) -> tuple[RunConfig, RunConfig, dict[str, tuple]]:
    """The run's stored config, the one to evaluate with (`overrides` applied) and their differences; a
    `ConfigError` for a change that would evaluate another model than the one trained."""
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a norga run directory (it holds no {CONFIG}): give the folder "
                          "`norga run` created and printed, e.g. runs/NAME-YYYYMMDD-HHMMSS.mmm-PID")
    stored = load_config(run_dir / CONFIG)
    config = load_config(run_dir / CONFIG, overrides)
    changes = config_differences(stored.to_dict(), config.to_dict())
    unsafe = [key for key in changes if not any(fnmatchcase(key, pattern) for pattern in EVALUATION_SAFE)]
    if unsafe:
        raise ConfigError(f"evaluate cannot change {', '.join(unsafe)}: the checkpoint was trained with the run's "
                          f"value; an evaluation may change only {', '.join(EVALUATION_SAFE)}")
    return stored, config, changes


def last_checkpointed_task(run_dir: Path, num_tasks: int) -> int:
    """The last task (0-based) with a checkpoint in `run_dir`; an error if there is none."""
    done = [task for task in range(num_tasks) if (run_dir / "checkpoints" / f"task{task + 1}.pt").is_file()]
    if not done:
        raise FileNotFoundError(f"{run_dir} has no task checkpoint yet (checkpoints/task1.pt ...): evaluate it once "
                                "its first task has finished")
    return done[-1]


def evaluation_method(built: BuiltRun, slots: str = "predicted", dist: Distributed = SINGLE_PROCESS):
    """The method ``built.config`` names, freshly built on `built`'s model and tasks for an evaluation with `slots`."""
    config = built.config
    seed_everything(config.seed)
    context = RunContext(built, train_tasks=training_schedule(built.tasks, config.data.joint), dist=dist)
    method = method_class(config.method)(context, config.settings)
    if slots not in method.slot_modes:
        raise ConfigError(f"--slots {slots}: {config.method} has {', '.join(method.slot_modes)} only")
    return method


def measure(method, task: int, slots: str, config: RunConfig) -> tuple[list[int], dict[str, list[float]]]:
    """Every seen test task after `task` through `method` (its state loaded): images and accuracies per matrix."""
    context, joint = method.ctx, config.data.joint
    num_test = len(context.test_tasks)
    matrices = {"accuracy": AccuracyMatrix(num_test, joint=joint)}
    if not joint:
        if slots == "predicted" and method.infers_tasks:
            matrices["task_identity"] = AccuracyMatrix(num_test)
        matrices["task_incremental"] = AccuracyMatrix(num_test)
    evaluate_seen_tasks(context, method, task, config.eval.batch_size, matrices["accuracy"],
                        matrices.get("task_identity"), matrices.get("task_incremental"), slots=slots)
    seen = matrices["accuracy"].tested(task)
    images = [int(matrices["accuracy"].total[i, task]) for i in range(seen)]
    return images, {name: [float(v) for v in matrices[name].accuracies()[:seen, task]]
                    for name in COLUMNS if name in matrices}


def reevaluate(run_dir: Path, built: BuiltRun, stored: RunConfig, changes: dict[str, tuple], task: int | None = None,
               slots: str = "predicted", dist: Distributed = SINGLE_PROCESS) -> Evaluation:
    """Evaluate `run_dir`'s checkpoint after `task` (0-based; None: the last) on `built` (`build_run` of the
    evaluation's config), with `slots` (one of the method's `slot_modes`)."""
    run_dir, config = Path(run_dir), built.config
    method = evaluation_method(built, slots, dist)
    steps = len(method.ctx.tasks)
    task = last_checkpointed_task(run_dir, steps) if task is None else task
    if not 0 <= task < steps:
        raise ConfigError(f"--task {task + 1}: the run has tasks 1 to {steps}")
    path = run_dir / "checkpoints" / f"task{task + 1}.pt"
    checkpoint = load_checkpoint(path)
    _check_belongs(checkpoint, run_dir, stored, path)
    missing = [key for key in method.heavy_state_dict() if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (the method's class statistics): restore it from "
                              "the run")
    method.load_state_dict(checkpoint["method"])
    method.load_heavy_state_dict({key: checkpoint[key] for key in method.heavy_state_dict()})
    images, accuracies = measure(method, task, slots, config)
    evaluation = Evaluation(run_dir, task, steps, slots, changes, config.eval.batch_size, images=images,
                            accuracies=accuracies)
    stored_matrices, seen = checkpoint.get("matrices", {}), len(images)
    evaluation.recorded = {name: [float(v) for v in AccuracyMatrix.from_dict(stored_matrices[name]).accuracies()
                                  [:seen, task]] for name in accuracies if name in stored_matrices}
    return evaluation


def _check_belongs(checkpoint: dict, run_dir: Path, stored: RunConfig, path: Path) -> None:
    """The checkpoint must have been written by this run under its config."""
    record = checkpoint.get("run") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or "method" not in checkpoint:
        raise CheckpointError(f"{path} is not a task checkpoint of a norga run: restore it from the run")
    if record.get("config_hash") != identity_hash(stored):
        raise CheckpointError(f"{path} was written under another config than {run_dir / CONFIG} (their identity "
                              "hashes differ): restore the run's own config.yaml and checkpoints")
    from norga.storage import load_json

    environment = run_dir / ENVIRONMENT
    run_id = load_json(environment).get("run_id") if environment.is_file() else None
    if run_id is not None and record.get("run_id") != run_id:
        raise CheckpointError(f"{path} belongs to another run (run id {str(record.get('run_id'))[:12]}, this "
                              f"directory's {ENVIRONMENT} says {run_id[:12]}): restore this run's own checkpoints")


def write_evaluation(evaluation: Evaluation, directory: Path | None = None) -> Path:
    """``taskK-SLOTS-STAMP.json`` and ``.csv`` in `directory` (default: the run directory's ``evaluations/``);
    returns the JSON's path."""
    directory = evaluation.run_dir / EVALUATIONS if directory is None else Path(directory)
    stem = directory / f"task{evaluation.task + 1}-{evaluation.slots}-{run_stamp()}"
    write_json(evaluation.to_dict(), stem.with_suffix(".json"))
    write_text(evaluation.to_csv(), stem.with_suffix(".csv"))
    return stem.with_suffix(".json")


def format_evaluation(evaluation: Evaluation) -> str:
    """The table `norga evaluate` prints: per seen task its images and accuracies, the mean, the run's own."""
    names = list(evaluation.accuracies)
    changed = ", ".join(f"{key}={new}" for key, (_, new) in evaluation.changes.items()) or "the run's own settings"
    lines = [f"{evaluation.run_dir} after task {evaluation.task + 1}/{evaluation.num_tasks}, slots "
             f"{evaluation.slots}, {changed}",
             f"{'task':>4} {'images':>7} " + " ".join(f"{COLUMNS[name]:>9}" for name in names)]
    for index, images in enumerate(evaluation.images):
        lines.append(f"{index + 1:>4} {images:>7} " + " ".join(f"{evaluation.accuracies[name][index]:9.2f}"
                                                               for name in names))
    lines.append(f"{'mean':>4} {sum(evaluation.images):>7} " + " ".join(f"{evaluation.mean(name):9.2f}"
                                                                      for name in names))
    recorded = [name for name in names if name in evaluation.recorded]
    if recorded:
        means = {name: sum(evaluation.recorded[name]) / len(evaluation.recorded[name]) for name in recorded}
        lines.append(f"{'run':>4} {'':>7} " + " ".join(f"{means[name]:9.2f}" if name in means else f"{'—':>9}"
                                                       for name in names) + "  (the run's own evaluation)")
    return "\n".join(lines)
