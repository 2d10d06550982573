"""Lower bound `linear_probe`: a linear head over all classes on frozen backbone features, trained task
after task with cross-entropy on the current task's classes (the official ``train_mask``), predicting over
every seen class. No prompts, no replay, no task-identity inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from norga.engine.context import RunContext
from norga.methods.base import ContinualMethod, ImageIds, Phase, Prediction, register_method
from norga.methods.training import PhaseTraining, masked_logits


@register_method("linear_probe")
class LinearProbe(PhaseTraining, ContinualMethod):
    """``linear_probe.train`` sets the optimisation; ``linear_probe.augment`` trains on fresh augmented views."""

    name = "linear_probe"

    def __init__(self, context: RunContext) -> None:
        self.ctx = context
        self.config = context.config.linear_probe
        self.head = nn.Linear(context.model.backbone.num_features, context.num_classes).to(context.device)

    def phases(self, task: int) -> list[Phase]:
        return [Phase("train_head", self.config.train.epochs)]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        cfg = self.config.train

        def batches(epoch: int):
            return self.ctx.frozen_training_batches(task, epoch, cfg.batch_size, self.config.augment, "linear_probe")

        self._fit_classifier(self.head, batches, self.ctx.class_mask(task), cfg, start_epoch, on_epoch_end,
                             "linear_probe.train.lr")

    @torch.inference_mode()
    def predict(self, images: Tensor, seen_tasks: int, frozen_features: Tensor | None = None,
                image_ids: ImageIds | None = None) -> Prediction:
        if frozen_features is None:
            frozen_features = self.ctx.frozen_encode(images)
        logits = self.head(frozen_features.to(self.ctx.device))
        seen = self.ctx.class_mask_until(seen_tasks - 1)
        return Prediction(masked_logits(logits, seen).argmax(dim=1).cpu())

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self._optimizer_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self._saved_optimizer = state["optimizer"]
