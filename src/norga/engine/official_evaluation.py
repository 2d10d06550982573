"""Evaluate an official code's own checkpoints with norga: ``norga evaluate --tii-dir DIR --prompt-dir DIR --preset
NAME``.

Official two-stage pipelines write one ``--output_dir`` per stage (the task-identity stage, the prompt stage), each
with a checkpoint per task. A preset says what model and benchmark they were trained on; a method that can read them
(its `ContinualMethod.official_evaluation_overrides` is not None) loads both stages' files of task k into itself
(`ContinualMethod.load_official`: every key accounted for) and every seen test task is evaluated as for a norga run,
with the settings the official checkpoints need unless the user sets others (``--set``). The record goes to the
folder the user names, by default ``<prompt-dir>-evaluations/`` beside the prompt stage's folder (never inside the
official one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from norga.config import ConfigError, RunConfig
from norga.config_io import load_config
from norga.engine.reevaluate import Evaluation, evaluation_method, measure
from norga.engine.resume_changes import config_differences
from norga.methods import method_class, method_names
from norga.runtime.context import BuiltRun
from norga.runtime.distributed import SINGLE_PROCESS, Distributed
from norga.storage import CheckpointError


@dataclass
class OfficialEvaluation(Evaluation):
    """An `Evaluation` of the official code's checkpoints: which files, which preset, what each key became."""

    preset: str = ""
    tii_dir: Path = Path()
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    compat: dict[str, Any] = field(default_factory=dict)  # the method's compat switches as evaluated

    def to_dict(self) -> dict[str, Any]:
        record = super().to_dict()
        for key in ("run_dir", "checkpoint", "recorded_by_the_run"):
            record.pop(key)
        files = {"task_identity_dir": str(self.tii_dir), "prompt_dir": str(self.run_dir)}
        return {"official_checkpoints": files, "preset": self.preset, **record, "compat": self.compat,
                "loaded": {stage: _summary(report) for stage, report in self.reports.items()}}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """What a loader report says, with the (long) list of loaded keys counted."""
    return {**{k: v for k, v in report.items() if k != "loaded"}, "keys_loaded": len(report["loaded"])}


def official_config(preset: str, overrides: list[str]) -> tuple[RunConfig, RunConfig, dict[str, tuple]]:
    """The preset's config, the one to evaluate with (the method's official-checkpoint settings unless `overrides`
    set them) and their differences; a `ConfigError` for a method that cannot read official checkpoints."""
    stored = load_config(preset, [])
    method = load_config(preset, overrides).method
    official = method_class(method).official_evaluation_overrides()
    if official is None:
        readers = [name for name in method_names() if method_class(name).official_evaluation_overrides() is not None]
        raise ConfigError(f"--preset {preset} (with --set) evaluates {method}, which cannot read an official code's "
                          f"checkpoints: give a preset of {' or '.join(readers)} (see `norga presets`)")
    config = load_config(preset, [*official, *overrides])
    return stored, config, config_differences(stored.to_dict(), config.to_dict())


def default_output(prompt_dir: Path) -> Path:
    """``<prompt-dir>-evaluations`` beside the official prompt stage's folder."""
    prompt_dir = Path(prompt_dir).resolve()
    return prompt_dir.with_name(f"{prompt_dir.name}-evaluations")


def evaluate_official(tii_dir: Path, prompt_dir: Path, preset: str, built: BuiltRun, changes: dict[str, tuple],
                      task: int | None = None, slots: str = "predicted", dist: Distributed = SINGLE_PROCESS
                      ) -> OfficialEvaluation:
    """Both official stages' checkpoints of `task` (0-based; None: the last both wrote) on the method `built`'s
    config names, built on its model and tasks, evaluated on every seen test task with `slots`."""
    tii_dir, prompt_dir, config = Path(tii_dir), Path(prompt_dir), built.config
    method = evaluation_method(built, slots, dist)
    steps = len(method.ctx.tasks)
    if task is None:
        both = sorted(set(method.official_tasks(tii_dir)) & set(method.official_tasks(prompt_dir)))
        if not both:
            raise FileNotFoundError(f"no task has checkpoints in both {tii_dir / 'checkpoint'} and "
                                    f"{prompt_dir / 'checkpoint'}: pass the --output_dir of the official "
                                    "task-identity run as --tii-dir and the prompt run's as --prompt-dir")
        task = both[-1] - 1
    if not 0 <= task < steps:
        raise ConfigError(f"--task {task + 1}: the preset's benchmark has tasks 1 to {steps} (set data.num_tasks "
                          "to the official run's)")
    try:
        reports = method.load_official(tii_dir, prompt_dir, task + 1)
    except CheckpointError as error:
        raise CheckpointError(str(error).replace("--output_dir of the official task-identity run",
                                                 "--output_dir of the official task-identity run as --tii-dir")
                              .replace("--output_dir of the official prompt run",
                                       "--output_dir of the official prompt run as --prompt-dir")
                              .replace("(set ", f"(with --preset {preset}: --set ")) from error
    images, accuracies = measure(method, task, slots, config)
    return OfficialEvaluation(prompt_dir, task, steps, slots, changes, config.eval.batch_size, images=images,
                              accuracies=accuracies, preset=preset, tii_dir=tii_dir, reports=reports,
                              compat=method.compat())
