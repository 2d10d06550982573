"""InfLoRA (Liang & Li, CVPR 2024; liangyanshuo/InfLoRA): interference-free low-rank adaptation, LORA_SPEC §2.

Per task a rank-r delta on the key and value rows of every block's ``attn.qkv``: its down-projection A is designed
(not trained) from the task's input second moments projected off the subspace that protects the old tasks (DualGPM,
`norga.methods.lora.dualgpm`), its up-projection B (zero at first) and the task's head train. Phases per task:

- ``design_down``: a no-grad pass over the task's augmented training images through the current model (the new B
  still zero) collects each block's second moment; A = its top-r free directions / √3;
- ``train_up``: epochs of cross-entropy on the task's head, B and that head trained (Adam, the cosine schedule);
- ``protect`` (not after the last task: nothing would read it): a second pass, with the trained B, updates the
  protected subspaces with the energy threshold ε_t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from norga.config import Fraction, OptimConfig, PositiveInt
from norga.methods.base import Phase
from norga.methods.lora.banks import InfLoRABank
from norga.methods.lora.common import LoRAMethod
from norga.methods.lora.dualgpm import Subspace, designed_down, energy_threshold, first_subspace, updated_subspace
from norga.methods.lora.moments import SecondMoments
from norga.methods.registry import register_method
from norga.runtime.context import RunContext

STATISTICS_STREAMS = {"design_down": "inflora_design", "protect": "inflora_protect"}


@dataclass
class InfLoRASettings:
    """InfLoRA's settings (section ``inflora:``); defaults: the official CIFAR-100 config (``cifar100_inflora``)."""

    rank: PositiveInt = 10  # r of every task's delta on k and v (official: 10; DomainNet 30)
    threshold_first: Fraction = 0.95  # energy threshold ε_0 of DualGPM (official lamb: 0.95 CIFAR, 0.98 ImageNet-R)
    threshold_end: Fraction = 1.0  # ε_t = first + (end − first)·t/T (official lame)
    train: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=20, lr=5e-4, batch_size=128, optimizer="adam", schedule="coda_cosine", clip_grad=None))
    official_retain_basis: bool = False  # compat: the first task's retain branch keeps the leading basis (its bug)


@register_method
class InfLoRA(LoRAMethod):
    """InfLoRA: designed down-projections off DualGPM's protected subspaces, trained up-projections, per-task heads."""

    name = "inflora"
    Settings = InfLoRASettings

    def __init__(self, context: RunContext, settings: InfLoRASettings) -> None:
        model = context.model
        if settings.rank > model.embed_dim:
            raise ValueError(f"inflora.rank {settings.rank} exceeds the backbone's width {model.embed_dim}: lower it")
        bank = InfLoRABank(len(context.tasks), model.depth, model.embed_dim, settings.rank)
        super().__init__(context, settings, bank, head_init="torch")
        self.subspaces: list[Subspace] = []  # per block, once a task has been absorbed
        self.tasks_absorbed = 0

    def phases(self, task: int) -> list[Phase]:
        last = task == self.num_tasks - 1
        return [Phase("design_down"), Phase("train_up", self.settings.train.epochs), *([] if last else [Phase("protect")])]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        if phase.name == "train_up":
            self.train_task(task, start_epoch, on_epoch_end)
            return
        moments = self.second_moments(task, STATISTICS_STREAMS[phase.name])
        if phase.name == "design_down":
            self.design(task, moments)
        else:
            self.protect(task, moments)

    @torch.no_grad()
    def second_moments(self, task: int, stream: str) -> torch.Tensor:
        """(depth, d, d) float64: every block's ``attn.qkv`` input second moment over the task's augmented training
        images (the official passes use the training loader), through every delta up to `task`."""
        moments = SecondMoments(self.model.depth, self.model.embed_dim, self.ctx.device)
        attachments = self.bank.attachments(task)
        hooked = {block: [attachments[block], hook] for block, hook in moments.hooks().items()}
        for batch in self.ctx.train_loader(task, 0, self.settings.train.batch_size, stream=stream):
            with self.ctx.autocast():
                self.model.forward_features(batch.images, hooked)
        return moments.means(self.ctx.dist)

    def design(self, task: int, moments: torch.Tensor) -> None:
        """Task `task`'s down-projections, block by block, off the protected subspaces (none before the first)."""
        if len(self.subspaces) not in (0, self.model.depth) or self.tasks_absorbed != task:
            raise RuntimeError(f"designing task {task + 1}'s down-projections needs the subspaces of {task} tasks, "
                               f"but {self.tasks_absorbed} were absorbed")
        for block in range(self.model.depth):
            subspace = self.subspaces[block] if self.subspaces else None
            down = designed_down(moments[block].cpu(), subspace, self.settings.rank)  # float64 on the CPU
            self.bank.down[task, block] = down.to(self.bank.down)

    def protect(self, task: int, moments: torch.Tensor) -> None:
        """DualGPM's update with task `task`'s second moments at threshold ε_task (once per task)."""
        if self.tasks_absorbed != task:
            raise RuntimeError(f"the protected subspaces hold {self.tasks_absorbed} tasks, not {task}: the update of "
                               f"task {task + 1} would be applied twice or out of order")
        s = self.settings
        threshold = energy_threshold(s.threshold_first, s.threshold_end, task, self.num_tasks)
        if not self.subspaces:
            self.subspaces = [first_subspace(moments[block].cpu(), threshold, s.official_retain_basis)
                              for block in range(self.model.depth)]
        else:
            self.subspaces = [updated_subspace(subspace, moments[block].cpu(), threshold)
                              for block, subspace in enumerate(self.subspaces)]
        self.tasks_absorbed = task + 1

    # ------------------------------------------------------------------ state
    def heavy_state_dict(self) -> dict[str, Any]:
        """The protected subspaces (float64 bases and their kinds) and how many tasks they hold."""
        return {"inflora_subspaces": {"bases": [subspace.basis for subspace in self.subspaces],
                                      "kinds": [subspace.kind for subspace in self.subspaces],
                                      "tasks_absorbed": self.tasks_absorbed}}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            stored = state["inflora_subspaces"]
            self.subspaces = [Subspace(basis.to(torch.float64), kind)
                              for basis, kind in zip(stored["bases"], stored["kinds"])]
            self.tasks_absorbed = int(stored["tasks_absorbed"])

    def compat(self) -> dict[str, Any]:
        return {"official_retain_basis": self.settings.official_retain_basis}

    def run_record(self) -> dict[str, Any]:
        """Per block, the stored basis's width and kind after the last absorbed task."""
        return {"inflora": {"tasks_absorbed": self.tasks_absorbed,
                            "subspaces": [{"block": block, "kind": subspace.kind, "width": subspace.basis.shape[1]}
                                          for block, subspace in enumerate(self.subspaces)]}}

    @classmethod
    def summary(cls, settings: InfLoRASettings) -> str:
        return (f"rank {settings.rank} on k, v; ε {settings.threshold_first:g}→{settings.threshold_end:g}; "
                f"epochs {settings.train.epochs} (lr {settings.train.lr:g})")
