"""A tiny generated continual benchmark and a tiny prompted ViT for engine tests."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import Dataset

from norga.config import OptimConfig, RunConfig, TAPConfig
from norga.engine.context import TaskDatasets
from norga.methods import METHODS
from norga.nn import PromptedViT
from norga.synthetic import synthetic_tasks

NUM_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, NOISE = 3, 2, 8, 4, 16, 0.5
PATCH, WIDTH = 8, 32  # the tiny ViT's patch size and embedding width


def make_tasks(seed: int = 0) -> list[TaskDatasets]:
    return synthetic_tasks(NUM_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, NOISE, seed)


def make_model(config: RunConfig, seed: int = 0) -> PromptedViT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                                     embed_dim=WIDTH, num_heads=2)
        slots = NUM_TASKS if METHODS[config.method].uses_prompt_slots else 0
        return PromptedViT(backbone, num_slots=slots, prompt_length=config.prompt.length,
                           prompt_layers=config.prompt.layers, gate=config.prompt.gate,
                           num_classes=NUM_TASKS * CLASSES_PER_TASK, prefix_layout=config.prompt.prefix_layout)


def tiny_config(**changes) -> RunConfig:
    config = RunConfig(method="norga", seed=7, cache_frozen_features=True)
    config.prompt.length, config.prompt.layers, config.prompt.gate = 2, [0, 1], "sigmoid"
    config.tii.mlp_hidden = [1]
    config.tii.train = OptimConfig(epochs=2, lr=1e-3, batch_size=4)
    config.tii.tap = TAPConfig(epochs=2, lr=0.01, samples_per_class=4)
    config.wtp.train = OptimConfig(epochs=2, lr=0.01, batch_size=4, schedule="step")
    config.wtp.tap = TAPConfig(epochs=2, lr=0.01, samples_per_class=8)
    config.eval.batch_size = 3
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = getattr(target, part)
        setattr(target, field, value)
    return config


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
