"""Lower bound `linear_probe`: a linear head over all classes on frozen backbone features, trained task
after task with cross-entropy on the current task's classes (the official ``train_mask``), predicting over
every seen class. No prompts, no replay, no task-identity inference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from norga.config import OptimConfig
from norga.methods.base import ContinualMethod, Phase, Prediction, PredictRequest
from norga.methods.registry import register_method
from norga.runtime.context import RunContext
from norga.runtime.training import PhaseTraining


@dataclass
class LinearProbeSettings:
    """Settings of the lower bound ``linear_probe`` (section ``linear_probe:``)."""

    augment: bool = False  # True: freshly augmented views through the frozen backbone each epoch; False: cached
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=10, lr=0.01, batch_size=64))


@register_method
class LinearProbe(PhaseTraining, ContinualMethod):
    """Lower bound: a linear head over all classes on frozen features, trained task after task."""

    name = "linear_probe"
    Settings = LinearProbeSettings

    def __init__(self, context: RunContext, settings: LinearProbeSettings) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.head = nn.Linear(self.model.backbone.num_features, context.num_classes).to(context.device)
        self.model.backbone.head.requires_grad_(False)  # it trains its own head, not the host's

    def phases(self, task: int) -> list[Phase]:
        return [Phase("train_head", self.settings.train.epochs)]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        cfg = self.settings.train

        def batches(epoch: int):
            return self.ctx.frozen_training_batches(task, epoch, cfg.batch_size, self.settings.augment, "linear_probe")

        self.fit_classifier(self.head, batches, self.ctx.class_mask(task), cfg, start_epoch, on_epoch_end)

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        frozen_features, seen_tasks, true_tasks = request.frozen_features, request.seen_tasks, request.true_tasks
        if frozen_features is None:
            frozen_features = self.ctx.frozen_encode(request.images)
        logits = self.head(frozen_features.to(self.ctx.device))
        within = None if true_tasks is None else self.within_task_classes(logits, true_tasks)
        return Prediction(self.seen_classes(logits, seen_tasks), within_task=within)

    def owned_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    @classmethod
    def summary(cls, settings: LinearProbeSettings) -> str:
        return f"epochs {settings.train.epochs} (lr {settings.train.lr:g}), augment {settings.augment}"
