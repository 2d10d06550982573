"""Class orders and task splits exactly as the official code draws them from the seed."""

from __future__ import annotations

import math
import random

import numpy as np

from norga.data.errors import BenchmarkOptionError

#: How the seed shuffles the classes: Python's `random` (the L2P / DualPrompt / HiDe-Prompt code) or numpy's PCG64
#: generator (VPT-NSP²'s code, `np.random.Generator(np.random.PCG64(seed)).shuffle`).
CLASS_ORDERS = ("random", "pcg64")


def class_order(num_classes: int, seed: int, shuffle: bool = True, rng: str = "random") -> list[int]:
    """The classes 0 .. C-1 shuffled by the seed: ``random.seed(seed); random.shuffle(labels)`` (the official
    --shuffle True), or with `rng` "pcg64" numpy's ``Generator(PCG64(seed)).shuffle(labels)``."""
    labels = list(range(num_classes))
    if not shuffle:
        return labels
    if rng == "pcg64":
        shuffled = np.array(labels, dtype=np.int64)
        np.random.Generator(np.random.PCG64(seed)).shuffle(shuffled)
        return shuffled.tolist()
    if rng != "random":
        raise BenchmarkOptionError(f"unknown class order {rng!r}; choose one of {list(CLASS_ORDERS)}")
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
