"""From a resolved config (`norga.engine.resolve.resolve_config`) to the objects a run needs: backbone, prompt host
model, task data, provenance records."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from norga.backbones import create_backbone
from norga.data import build_benchmark
from norga.engine.resolve import ResolvedConfig
from norga.nn import PromptedViT
from norga.runtime.context import BuiltRun, TaskDatasets
from norga.runtime.seeding import seed_everything

__all__ = ["BuiltRun", "build_run"]


def build_run(resolved: ResolvedConfig, tasks: Sequence[TaskDatasets] | None = None) -> BuiltRun:
    """Backbone (with its weights, strictly loaded), benchmark sized to it, and the prompt host model, for the
    config `resolve_config` returned (the built run carries that config: what runs and what config.yaml records).

    `tasks` (library use, tests) replaces the configured benchmark with task data of your own (resolve its config
    with ``locate_data=False``); its classes must be 0 .. C-1. Seeded first, so random initialisations (a randomly
    initialised backbone, the head) are a function of the seed alone, also when one process builds several runs
    (`norga compare`). ``config.compile`` compiles the model's blocks. The method builds its own prompts on the host
    when the engine creates it.
    """
    config = resolved.config
    if tasks is None and not resolved.data_located:
        raise ValueError("build_run without tasks reads the configured benchmark: resolve its config with "
                         "resolve_config(config), not locate_data=False")
    seed_everything(config.seed)
    backbone, record = create_backbone(
        config.backbone.name, weights=config.backbone.weights, **config.backbone.timm_kwargs
    )
    if tasks is None:
        benchmark = build_benchmark(config.data, seed=config.seed, image_size=record.input_size[-1],
                                    mean=tuple(record.mean), std=tuple(record.std))
        tasks = [TaskDatasets(list(task.classes), task.train, task.train_eval, task.test) for task in benchmark.tasks]
        num_classes, benchmark_record = benchmark.num_classes, benchmark.record()
    else:
        tasks = list(tasks)
        num_classes = 1 + max(c for task in tasks for c in task.classes)
        benchmark_record = {"name": "user-supplied tasks", "num_tasks": len(tasks),
                            "task_classes": [list(task.classes) for task in tasks]}
    model = PromptedViT(
        backbone,
        num_classes=num_classes,
        attention_impl=config.attention_impl,
        train_fc_norm=not isinstance(getattr(backbone, "fc_norm", nn.Identity()), nn.Identity),
    )
    init_generator = torch.Generator().set_state(torch.get_rng_state())
    if config.compile:
        model.compile_blocks()
    records = {"backbone": record.to_dict(), "benchmark": benchmark_record, "data_root": config.data.root,
               "device": str(resolved.device), "precision": dict(resolved.precision)}
    return BuiltRun(config, model, tasks, num_classes, resolved.device, init_generator, records)
