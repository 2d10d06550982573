"""One linear head per task over that task's classes, read as logits over every class of the benchmark.

InfLoRA's ``classifier_pool`` (one ``nn.Linear`` per task, torch's default initialisation) and SD-LoRA's growing
head (old rows copied, new rows Kaiming-uniform with zero bias; `kaiming_linear`) compute the same logits as this:
a task's rows train only during its task, and a frozen task's head is exactly the old rows of a growing one.
Keeping them apart lets a phase train only the current task's head (no gradient, no weight decay on old rows).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from norga.runtime.training import NEG_INF

HeadInit = Literal["torch", "kaiming_linear"]


class TaskHeads(nn.Module):
    """Heads[t]: Linear(dim, |classes of task t|); `logits` places them at their classes' columns."""

    def __init__(self, dim: int, task_classes: list[list[int]], num_classes: int, init: HeadInit = "torch",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.task_classes = [list(classes) for classes in task_classes]
        self.heads = nn.ModuleList(nn.Linear(dim, len(classes)) for classes in task_classes)
        if init == "kaiming_linear":  # SD-LoRA's SimpleLinear: kaiming_uniform_(nonlinearity='linear'), bias 0
            with torch.no_grad():
                for head in self.heads:
                    bound = (3 / dim) ** 0.5
                    head.weight.uniform_(-bound, bound, generator=generator)
                    head.bias.zero_()

    def train_only(self, task: int | None) -> list[nn.Parameter]:
        """Make head `task` the only trainable one (None: none); returns its parameters."""
        for index, head in enumerate(self.heads):
            head.requires_grad_(index == task)
        return [] if task is None else list(self.heads[task].parameters())

    def logits(self, features: Tensor, tasks: range) -> Tensor:
        """(B, num_classes): the heads of `tasks` at their classes' columns, -inf at every other class."""
        columns = torch.tensor([c for task in tasks for c in self.task_classes[task]], device=features.device)
        parts = torch.cat([self.heads[task](features) for task in tasks], dim=1)
        empty = parts.new_full((features.shape[0], self.num_classes), NEG_INF)
        return empty.index_copy(1, columns, parts)
