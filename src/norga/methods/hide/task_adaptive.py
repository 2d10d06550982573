"""Task-adaptive prediction (TAP, HiDe-Prompt): a classifier retrained on Gaussian samples of every seen class's
features, as a stage any method can run (HiDe-Prompt's task-identity model and prompted head; a RanPAC-style
task-identity head or a classifier alignment likewise)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from norga.methods.hide.gaussians import ClassGaussians, official_tap_batches
from norga.methods.hide.settings import TAPConfig
from norga.runtime.seeding import generator
from norga.runtime.training import PhaseTraining, masked_logits


@dataclass
class TaskAdaptiveTraining:
    """Retrains a classifier on draws from `gaussians` (the statistics of every seen class) with the settings `tap`
    (a section of the owning method's settings: a `TAPConfig`, or one with the same fields and another optimizer);
    `stream` names the draws' seed stream (seed, stream, task, epoch). `iteration_lr` replaces the section's
    per-epoch schedule by a per-iteration one: ``iteration_lr(i, total, base_lr)`` at iteration i of `total` (SMoPE's
    classifier alignment)."""

    gaussians: ClassGaussians
    tap: TAPConfig | Any
    stream: str
    iteration_lr: Callable[[int, int, float], float] | None = None

    def run(self, trainer: PhaseTraining, task: int, classifier: Callable[[Tensor], Tensor], params: list[Tensor],
            start_epoch: int, on_epoch_end: Callable[[int, dict], None], train: Sequence[nn.Module] = ()) -> None:
        """After task `task`: `classifier` (whose trainable tensors are `params`) learns the seen classes with
        cross-entropy masked to them, in `trainer`'s training loop. Every process draws the same samples."""
        ctx, cfg = trainer.ctx, self.tap
        seen = ctx.classes_until(task)
        allowed = ctx.class_mask_until(task)
        chunks = len(ctx.classes_before(task)) if cfg.official_chunking else len(seen)

        def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            draws = official_tap_batches(self.gaussians, seen, chunks, cfg.samples_per_class,
                                         generator(ctx.config.seed, self.stream, task, epoch))
            for features, labels in draws:
                yield features.to(ctx.device), labels.to(ctx.device)

        def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
            features, labels = batch
            return F.cross_entropy(masked_logits(classifier(features), allowed), labels)

        step_lr = None
        if self.iteration_lr is not None:
            steps = min(chunks, len(seen))  # per epoch (`official_tap_batches`)
            total, schedule = cfg.epochs * steps, self.iteration_lr

            def step_lr(epoch: int, step: int, base_lr: float) -> float:
                return schedule(epoch * steps + step, total, base_lr)

        trainer.train_phase(cfg, [{"params": params}], batches, loss, start_epoch, on_epoch_end, train=train,
                            sharded=False, step_lr=step_lr)
