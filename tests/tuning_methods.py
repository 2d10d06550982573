"""Tiny test-only methods that train more than prompts (host parameters, modules attached inside blocks), run by
the real engine on the engine fixtures, and what a test needs to register them and to kill and resume their runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from engine_fixtures import build
from torch import Tensor, nn

from norga.config import OptimConfig
from norga.engine.loop import Engine, open_run
from norga.methods import (
    METHODS,
    ContinualMethod,
    Phase,
    Prediction,
    PredictRequest,
    register_method,
)
from norga.runtime.training import PhaseTraining, masked_logits


@dataclass
class TuningSettings:
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, lr=0.05, batch_size=4))


class TinyTuning(PhaseTraining, ContinualMethod):
    """One phase per task: masked cross-entropy through the host, training `trained_parameters()` (by default the
    host's trainable parameters). Subclasses add what they train and how the forward uses it (`logits`)."""

    Settings = TuningSettings

    def __init__(self, context, settings: TuningSettings) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.optimizer = None
        self._saved_optimizer = None

    def trained_parameters(self) -> list[nn.Parameter]:
        return self.model.head_parameters()

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images).logits

    def phases(self, task: int) -> list[Phase]:
        return [Phase("tune", self.settings.train.epochs)]

    def run_phase(self, task, phase, start_epoch, on_epoch_end) -> None:
        cfg = self.settings.train
        allowed = self.ctx.class_mask(task)

        def loss(batch) -> Tensor:
            ce = F.cross_entropy(masked_logits(self.logits(batch.images), allowed), batch.labels, reduction="none")
            return self.ctx.batch_mean(ce, batch)

        self.train_phase(cfg, [{"params": self.trained_parameters()}],
                         lambda epoch: self.ctx.train_loader(task, epoch, cfg.batch_size), loss, start_epoch,
                         on_epoch_end, train=[self.model])

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        logits = self.logits(request.images.to(self.ctx.device))
        true_tasks = request.true_tasks
        within = None if true_tasks is None else self.within_task_classes(logits, true_tasks)
        return Prediction(self.seen_classes(logits, request.seen_tasks), within_task=within)


class NormTuning(TinyTuning):
    """Trains the head and one LayerNorm weight of the frozen backbone, ``blocks.0.norm1.weight``.

    Written as a method author would on any norga: the weight is made trainable where it is, and the checkpoint
    state is the mixin's model and optimizer state."""

    name = "test_norm_tuning"

    def __init__(self, context, settings: TuningSettings) -> None:
        super().__init__(context, settings)
        self.model.backbone.blocks[0].norm1.weight.requires_grad_(True)

    def state_dict(self) -> dict:
        return self._model_and_optimizer_state()

    def load_state_dict(self, state: dict) -> None:
        self._load_trainable_model_state(state["model"])
        self._saved_optimizer = state["optimizer"]


@contextlib.contextmanager
def registered(*methods: type[ContinualMethod]):
    """The methods registered for the test, and gone after it (other tests list every registered method)."""
    for method in methods:
        register_method(method)
    try:
        yield
    finally:
        for method in methods:
            METHODS.pop(method.name, None)


def run_engine(config, directory, *, resume: bool = False, **kwargs) -> Engine:
    """Run (or resume) `config` on the engine fixtures as `norga run` does; returns the engine after its run."""
    engine = open_run(build(config), directory, resume=resume, **kwargs)
    engine.run()
    return engine
