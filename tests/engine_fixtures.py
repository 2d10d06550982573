"""A tiny generated continual benchmark and a tiny prompted ViT for engine tests."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Dataset

from norga.config import SHARED_KEYS, RunConfig
from norga.config_io import load_config, read_source
from norga.engine.build import BuiltRun, build_run
from norga.engine.loop import Engine, Position
from norga.engine.resolve import resolve_config
from norga.engine.run_dir import RunDirectory
from norga.runtime.context import TaskDatasets
from norga.synthetic import synthetic_tasks

NUM_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, NOISE = 3, 2, 8, 4, 16, 0.5
NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK
PATCH, WIDTH = 8, 32  # the tiny ViT's patch size and embedding width (tests/tiny.yaml)
TINY = Path(__file__).with_name("tiny.yaml")


def make_tasks(seed: int = 0) -> list[TaskDatasets]:
    return synthetic_tasks(NUM_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, NOISE, seed)


def tiny_config(method: str = "norga", **changes) -> RunConfig:
    """tests/tiny.yaml for `method`, through `load_config` as a user's run; `changes` are ``--set`` keys, those
    not of the shared schema relative to the method's section (``wtp.train.lr`` -> ``norga.wtp.train.lr``).

    A method without a section there runs with its defaults shrunk to the fixture's scale (`shrunk`)."""
    overrides = [f"method={method}"]
    if method not in read_source(TINY):
        overrides += [f"{method}.{key}={json.dumps(value)}" for key, value in shrunk(method).items()]
    for key, value in changes.items():
        dotted = key if key.split(".")[0] in SHARED_KEYS else f"{method}.{key}"
        overrides.append(f"{dotted}={json.dumps(value)}")
    return load_config(TINY, overrides)


#: Setting names (last part of the dotted key) and their values at the fixture's scale.
SMALL = {"epochs": 1, "batch_size": 4, "samples_per_class": 4, "length": 2, "g_length": 2, "pool_size": 6, "top_k": 2,
         "mlp_hidden": [1]}


def shrunk(method: str) -> dict:
    """The method's defaults at the fixture's scale: epochs, batch sizes, lengths and pools small, layers in [0, 1]."""
    from norga.config_io import flat_settings
    from norga.methods import settings_class

    small = {}
    for key, value in flat_settings(settings_class(method)()).items():
        name = key.rsplit(".", 1)[-1]
        if name in SMALL and value not in (None, 0, []):
            small[key] = SMALL[name]
        elif name.endswith("layers") and isinstance(value, list) and value:
            small[key] = [0, 1][: len(value)]
    return small


def build(config: RunConfig, tasks: list[TaskDatasets] | None = None, **changes) -> BuiltRun:
    """What `norga run` builds, on the generated tasks (or `tasks`); `changes` replace fields of the built run
    (e.g. ``records``)."""
    built = build_run(resolve_config(config, locate_data=False), tasks=tasks or make_tasks())
    return replace(built, **changes)


def on_generated_tasks(monkeypatch, tasks_for=lambda config: make_tasks()) -> None:
    """`norga run` and `run_method` (compare, quickstart, sweeps) on generated tasks instead of the configured
    benchmark's data: the data is not looked for, and each run is built on ``tasks_for(config)``."""
    from norga.engine import build as build_module
    from norga.engine import resolve as resolve_module

    monkeypatch.setattr(resolve_module, "resolve_config", lambda config: resolve_config(config, locate_data=False))
    monkeypatch.setattr(build_module, "build_run",
                        lambda resolved: build_run(resolved, tasks=tasks_for(resolved.config)))


def make_model(config: RunConfig):
    return build(config).model


class Crash(RuntimeError):
    """A crash injected at a checkpoint."""


def crash_at(position: Position):
    """An `after_epoch` hook that kills the run right after the checkpoint at `position` is written."""
    def after_epoch(at: Position) -> None:
        if at == position:
            raise Crash(f"killed at {at}")
    return after_epoch


def run_fixture(config: RunConfig, directory: Path, tasks: list[TaskDatasets] | None = None, **kwargs):
    """`run_experiment` as `norga run` calls it, on the generated tasks (or `tasks`)."""
    from norga.engine.loop import run_experiment

    return run_experiment(build(config, tasks), directory, **kwargs)


def make_engine(config: RunConfig, directory: Path | RunDirectory, tasks: list[TaskDatasets] | None = None,
                **kwargs) -> Engine:
    """A new run's engine on the generated tasks (a `RunDirectory` is used as it is)."""
    run_dir = directory if isinstance(directory, RunDirectory) else RunDirectory(Path(directory))
    return Engine(build(config, tasks), run_dir, **kwargs)


class FailingDataset(Dataset):
    """Wraps a dataset and raises on the `fail_at`-th item read (counted across epochs): a crash mid-epoch."""

    def __init__(self, dataset: Dataset, fail_at: int) -> None:
        self.dataset, self.fail_at, self.reads = dataset, fail_at, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.fail_at:
            raise RuntimeError("injected failure")
        return self.dataset[index]
