"""From a resolved `RunConfig` to the objects a run needs: device, backbone, prompt host model, task data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from norga.backbones import create_backbone
from norga.config import RunConfig
from norga.data import build_benchmark, check_benchmark_data
from norga.nn import PromptedViT
from norga.runtime.context import TaskDatasets
from norga.runtime.precision import native_bf16, resolve_amp
from norga.runtime.seeding import seed_everything


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available: use --set device=cpu")
    return torch.device(name)


@dataclass
class BuiltRun:
    model: PromptedViT
    tasks: list[TaskDatasets]
    num_classes: int
    device: torch.device
    records: dict[str, Any]
    init_generator: torch.Generator  # the seeded stream after the backbone and head: methods initialise from it


def build_run(config: RunConfig, tasks: Sequence[TaskDatasets] | None = None) -> BuiltRun:
    """Backbone (with its weights, strictly loaded), benchmark sized to it, and the prompt host model.

    `tasks` (library use, tests) replaces the configured benchmark with task data of your own; its classes
    must be 0 .. C-1. Seeded first, so random initialisations (a randomly initialised backbone, the head)
    are a function of ``config.seed`` alone, also when one process builds several runs (`norga compare`).
    ``config.amp`` is resolved in place (``auto`` -> ``bf16`` or ``none`` for the device; the engine only
    knows those two) and ``config.data.root`` to the absolute root the data was found under, so the run
    directory's config.yaml records what ran; ``config.compile`` compiles the model's blocks. The method
    builds its own prompts on the host when the engine creates it.
    """
    seed_everything(config.seed)
    if tasks is None:  # before any weights are fetched; the root found is recorded
        config.data.root = check_benchmark_data(
            config.data.benchmark, data_root=config.data.root, download=config.data.download,
            split_manifest=config.data.split_manifest, fiveds_transform_carryover=config.data.fiveds_transform_carryover)
    backbone, record = create_backbone(
        config.backbone.name, weights=config.backbone.weights, **config.backbone.timm_kwargs
    )
    if tasks is None:
        benchmark = build_benchmark(
            config.data.benchmark,
            data_root=config.data.root,
            seed=config.seed,
            num_tasks=config.data.num_tasks,
            image_size=record.input_size[-1],
            mean=tuple(record.mean),
            std=tuple(record.std),
            normalization=config.data.normalization,
            train_per_class=config.data.train_per_class,
            test_per_class=config.data.test_per_class,
            download=config.data.download,
            fiveds_transform_carryover=config.data.fiveds_transform_carryover,
            skip_unreadable=config.data.skip_unreadable,
            memory_budget_mb=config.data.memory_budget_mb,
            split_manifest=config.data.split_manifest,
        )
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
    device = resolve_device(config.device)
    return BuiltRun(model, tasks, num_classes, device,
                    {"backbone": record.to_dict(), "benchmark": benchmark_record, "data_root": config.data.root,
                     "device": str(device), "precision": resolve_precision(config, device)}, init_generator)


def resolve_precision(config: RunConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Resolve ``config.amp`` in place for `device` (``auto`` -> ``bf16`` or ``none``) and say what was decided.

    `RunContext.autocast` knows only ``bf16`` and ``none``, so this must run before the engine sees the config.
    """
    device = device or resolve_device(config.device)
    record = {"amp_requested": config.amp, "native_bf16": native_bf16(device), "compile": config.compile}
    config.amp = resolve_amp(config.amp, device)
    return {**record, "amp": config.amp}
