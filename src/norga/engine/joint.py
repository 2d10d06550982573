"""The joint-training upper bound: all tasks of a benchmark merged into one training task.

With ``data.joint=true`` the engine hands a method a single task holding the union of every task's
classes and images, runs that task's phases once, and evaluates on every original task's test set
(a T×1 accuracy matrix). Any method works unchanged; for HiDe-Prompt / NoRGa this means one prompt
slot trained on all classes, no task-adaptive step (task 0 has none) and trivial task-identity
inference (there is only one task to infer).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import ConcatDataset

from norga.runtime.context import TaskDatasets


def joint_task(tasks: Sequence[TaskDatasets]) -> TaskDatasets:
    """One task with every task's classes (in order) and the concatenation of their datasets."""
    if not tasks:
        raise ValueError("joint training needs at least one task")
    return TaskDatasets(
        classes=[label for task in tasks for label in task.classes],
        train=ConcatDataset([task.train for task in tasks]),
        train_eval=ConcatDataset([task.train_eval for task in tasks]),
        test=ConcatDataset([task.test for task in tasks]),
    )


def training_schedule(tasks: Sequence[TaskDatasets], joint: bool) -> list[TaskDatasets]:
    """The tasks a method trains on, in order: the benchmark's tasks, or their union as one task."""
    return [joint_task(tasks)] if joint else list(tasks)
