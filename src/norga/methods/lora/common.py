"""What InfLoRA and SD-LoRA share: a bank of per-task LoRA deltas on the host, a head per task, one forward pass.

Training a task is a full forward and backward through the ViT (the deltas act from block 0, so no frozen feature
stays valid), under the run's precision (`RunContext.autocast`: bf16 where native, the frozen weights held once in
bf16); the loss is cross-entropy over the current task's classes (InfLoRA's current head; SD-LoRA's masked CE over
the new classes). Prediction is one pass with every task's delta so far, argmax over the seen classes' heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.methods.base import ContinualMethod, Prediction, PredictRequest
from norga.methods.lora.heads import HeadInit, TaskHeads
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.optim import PhaseOptimization
from norga.runtime.training import PhaseTraining


class LoRAMethod(PhaseTraining, ContinualMethod):
    """A method whose state is `bank` (per-task deltas with ``train_only(task)`` and ``attachments(upto)`` for the
    host) and `heads` (one per task)."""

    bank: nn.Module

    def __init__(self, context: RunContext, settings: Any, bank: nn.Module, head_init: HeadInit,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.model.backbone.head.requires_grad_(False)  # the heads below replace the host's
        self.num_tasks = len(context.tasks)
        self.bank = bank.to(context.device)
        classes = [context.classes(task) for task in range(self.num_tasks)]
        self.heads = TaskHeads(self.model.embed_dim, classes, context.num_classes, head_init, generator)
        self.heads.to(context.device)
        self.optimizer = None
        self._saved_optimizer = None

    def logits(self, images: Tensor, upto: int, heads: range | None = None) -> Tensor:
        """Logits (B, classes) of one pass with the deltas of tasks 0..`upto`, from `heads` (default: 0..`upto`), on
        the pre-logits as timm's head sees them (after ``fc_norm``, Identity on a class-token ViT)."""
        features = self.model.backbone.fc_norm(self.model.forward_features(images, self.bank.attachments(upto)))
        return self.heads.logits(features, heads if heads is not None else range(upto + 1))

    def train_task(self, task: int, start_epoch: int, on_epoch_end: Callable[[int, dict], None],
                   optimizer: PhaseOptimization | None = None) -> None:
        """Epochs of task `task`: cross-entropy over its classes (its own head) through every delta up to it;
        only the bank's tensors for the task and its head train."""
        cfg = self.settings.train
        params = [*self.bank.train_only(task), *self.heads.train_only(task)]

        def loss(batch: TrainBatch) -> Tensor:
            with self.ctx.autocast():
                logits = self.logits(batch.images, task, range(task, task + 1))
            return self.ctx.batch_mean(F.cross_entropy(logits.float(), batch.labels, reduction="none"), batch)

        self.train_phase(cfg, [{"params": params}], lambda epoch: self.ctx.train_loader(task, epoch, cfg.batch_size),
                         loss, start_epoch, on_epoch_end, train=[self.bank, self.heads], optimizer=optimizer)

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """One pass with every seen task's delta; the argmax over the seen classes (and within each true task)."""
        with self.ctx.autocast():
            logits = self.logits(request.images.to(self.ctx.device), request.seen_tasks - 1).float()
        within = None if request.true_tasks is None else self.within_task_classes(logits, request.true_tasks)
        return Prediction(self.seen_classes(logits, request.seen_tasks), within_task=within)

    def owned_modules(self) -> dict[str, nn.Module]:
        return {"lora": self.bank, "heads": self.heads}
