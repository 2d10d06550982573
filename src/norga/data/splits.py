"""Class orders and task splits exactly as the official code draws them from the seed."""

from __future__ import annotations

import math
import random

from norga.data.errors import BenchmarkOptionError


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """``random.seed(seed); labels = list(range(C)); random.shuffle(labels)`` (the official --shuffle True)."""
    labels = list(range(num_classes))
    if shuffle:
        random.seed(seed)
        random.shuffle(labels)
    return labels


def split_into_tasks(order: list[int], num_tasks: int) -> list[list[int]]:
    """Task i = order[i·k:(i+1)·k] with k = ceil(C / T); every task must get at least one class."""
    if not 0 < num_tasks <= len(order):
        raise BenchmarkOptionError(f"cannot split {len(order)} classes into {num_tasks} tasks: choose num_tasks "
                                   f"(--set data.num_tasks=N) from 1 to {len(order)}")
    per_task = math.ceil(len(order) / num_tasks)
    tasks = [sorted(order[i * per_task : (i + 1) * per_task]) for i in range(num_tasks)]
    if any(not task for task in tasks):
        raise BenchmarkOptionError(f"{len(order)} classes in {num_tasks} tasks of {per_task} leaves a task empty: "
                                   "use fewer tasks")
    return tasks
