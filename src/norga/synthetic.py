"""A generated continual benchmark (class = fixed random image template + noise) for tests and benchmarks."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from norga.runtime.context import TaskDatasets


def synthetic_tasks(
    num_tasks: int = 3, classes_per_task: int = 2, train_per_class: int = 8, test_per_class: int = 4,
    size: int = 16, noise: float = 0.5, seed: int = 0,
) -> list[TaskDatasets]:
    """Tasks of consecutive classes; images are ``template[class] + noise·N(0, 1)``, shaped (3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_tasks * classes_per_task, 3, size, size, generator=g)

    def split(classes: list[int], per_class: int) -> TensorDataset:
        labels = torch.tensor(classes).repeat_interleave(per_class)
        return TensorDataset(templates[labels] + noise * torch.randn(len(labels), 3, size, size, generator=g), labels)

    tasks = []
    for task in range(num_tasks):
        classes = list(range(task * classes_per_task, (task + 1) * classes_per_task))
        train = split(classes, train_per_class)
        tasks.append(TaskDatasets(classes, train, train, split(classes, test_per_class)))
    return tasks
