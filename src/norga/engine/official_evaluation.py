"""Evaluate the official NoRGa / HiDe-Prompt code's own checkpoints with norga: ``norga evaluate --tii-dir DIR
--prompt-dir DIR --preset NAME``.

The official scripts run two stages, each with its own ``--output_dir`` (e.g. ``output/NoRGa_cifar100_sup21k_
covariance_mlp_2_seed42`` for the task-identity stage, ``output/NoRGa_cifar100_vit_pe_seed42`` for the prompt stage),
each writing ``checkpoint/task<k>_checkpoint.pth`` after task k. A preset says what model and benchmark they were
trained on; both stages' files of task k load into it (`load_official_task`: every key accounted for) and every
seen test task is evaluated as for a norga run. The prefix layout defaults to the official one (the prompts were
trained with it); ``--set <method>.prefix_layout=correct`` overrides it. The record goes to the folder the user
names, by default ``<prompt-dir>-evaluations/`` beside the prompt stage's folder (never inside the official one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from norga.config import RunConfig
from norga.config_io import ConfigError, load_config
from norga.engine.checkpoint import CheckpointError
from norga.engine.distributed import SINGLE_PROCESS, Distributed
from norga.engine.reevaluate import Evaluation, evaluation_method, measure
from norga.engine.resume_changes import config_differences
from norga.official import OFFICIAL_CHECKPOINT, OfficialCheckpointError, official_task_checkpoints
from norga.official_tii import load_official_task

#: The prefix layout official checkpoints are evaluated with unless the user sets another.
OFFICIAL_LAYOUT = "official"


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
    """The preset's config, the one to evaluate with (official prefix layout unless `overrides` set one) and
    their differences; a `ConfigError` for a method the official checkpoints are not of."""
    stored = load_config(preset, [])
    method = load_config(preset, overrides).method
    if method not in ("hide", "norga"):
        raise ConfigError(f"--preset {preset} (with --set) evaluates {method}: official checkpoints are the official "
                          "HiDe-Prompt / NoRGa code's, give a hide or norga preset (see `norga presets`)")
    layout = f"{method}.prefix_layout"
    config = load_config(preset, [f"{layout}={OFFICIAL_LAYOUT}", *overrides])
    return stored, config, config_differences(stored.to_dict(), config.to_dict())


def official_tasks(directory: Path) -> list[int]:
    """The task numbers (1-based) the official run in `directory` wrote checkpoints of."""
    pattern = OFFICIAL_CHECKPOINT.split("/")[-1].replace("{}", r"(\d+)").replace(".", r"\.")
    return sorted(int(m.group(1)) for f in (directory / "checkpoint").glob("task*_checkpoint.pth")
                  if (m := re.fullmatch(pattern, f.name)))


def default_output(prompt_dir: Path) -> Path:
    """``<prompt-dir>-evaluations`` beside the official prompt stage's folder."""
    prompt_dir = Path(prompt_dir).resolve()
    return prompt_dir.with_name(f"{prompt_dir.name}-evaluations")


def evaluate_official(tii_dir: Path, prompt_dir: Path, preset: str, model, tasks, num_classes: int,
                      stored: RunConfig, config: RunConfig, changes: dict[str, tuple], task: int | None = None,
                      slots: str = "predicted", device: torch.device | None = None,
                      dist: Distributed = SINGLE_PROCESS, init_generator: torch.Generator | None = None
                      ) -> OfficialEvaluation:
    """Both official stages' checkpoints of `task` (0-based; None: the last both wrote) on the method `config`
    builds on `model` and `tasks`, evaluated on every seen test task with `slots`."""
    tii_dir, prompt_dir = Path(tii_dir), Path(prompt_dir)
    method = evaluation_method(model, tasks, num_classes, config, slots, device, dist, init_generator)
    steps = len(method.ctx.tasks)
    if task is None:
        both = sorted(set(official_tasks(tii_dir)) & set(official_tasks(prompt_dir)))
        if not both:
            raise FileNotFoundError(f"no task has checkpoints in both {tii_dir / 'checkpoint'} and "
                                    f"{prompt_dir / 'checkpoint'}: pass the --output_dir of the official "
                                    "task-identity run as --tii-dir and the prompt run's as --prompt-dir")
        task = both[-1] - 1
    if not 0 <= task < steps:
        raise ConfigError(f"--task {task + 1}: the preset's benchmark has tasks 1 to {steps} (set data.num_tasks "
                          "to the official run's)")
    try:
        official_task_checkpoints(tii_dir, prompt_dir, task + 1)
    except OfficialCheckpointError as error:
        raise CheckpointError(str(error).replace("--output_dir of the official task-identity run",
                                                 "--output_dir of the official task-identity run as --tii-dir")
                              .replace("--output_dir of the official prompt run",
                                       "--output_dir of the official prompt run as --prompt-dir")) from error
    try:
        reports = load_official_task(model, method.prompts, method.tii, tii_dir, prompt_dir, task + 1)
    except OfficialCheckpointError as error:
        raise CheckpointError(f"{error} (with --preset {preset}: --set {config.method}.prompt.length, "
                              f"{config.method}.prompt.layers, {config.method}.tii.mlp_hidden, data.num_tasks or "
                              "backbone.* to the official run's)") from error
    images, accuracies = measure(method, task, slots, config)
    return OfficialEvaluation(prompt_dir, task, steps, slots, changes, config.eval.batch_size, images=images,
                              accuracies=accuracies, preset=preset, tii_dir=tii_dir,
                              reports={stage: report.to_dict() for stage, report in reports.items()},
                              compat=method.compat())
