"""Class orders and task splits exactly as the official code draws them from the seed."""

from __future__ import annotations

import math
import random

import numpy as np

from norga.data.errors import BenchmarkOptionError

#: How the seed orders the classes (``data.class_order``; `class_order` says each rule's official code).
CLASS_ORDERS = ("random", "numpy", "pcg64", "none")


def class_order(num_classes: int, seed: int, shuffle: bool = True, rule: str = "random") -> list[int]:
    """The classes in the order the official code draws from `seed` (``data.class_order``):

    - ``random``: ``random.seed(seed); labels = list(range(C)); random.shuffle(labels)`` (HiDe-Prompt's --shuffle);
    - ``numpy``: ``np.random.seed(seed); np.random.permutation(C)`` (the PyCIL family: SD-LoRA, RanPAC);
    - ``pcg64``: ``np.random.Generator(np.random.PCG64(seed)).shuffle(labels)`` (VPT-NSP²'s code);
    - ``none`` (or ``shuffle`` False): the dataset's own order (InfLoRA's ``shuffle: false``).
    """
    if rule not in CLASS_ORDERS:
        raise BenchmarkOptionError(f"unknown class order {rule!r}; choose one of {CLASS_ORDERS}")
    labels = list(range(num_classes))
    if not shuffle or rule == "none":
        return labels
    if rule == "numpy":
        return np.random.RandomState(seed % 2**32).permutation(num_classes).tolist()
    if rule == "pcg64":
        shuffled = np.array(labels, dtype=np.int64)
        np.random.Generator(np.random.PCG64(seed)).shuffle(shuffled)
        return shuffled.tolist()
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
