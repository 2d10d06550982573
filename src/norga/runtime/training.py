"""What every gradient-trained method shares: masked logits, the optimizer step (gradients summed over
processes in a distributed run), the per-epoch finiteness check, a fresh optimizer per phase that survives a
resume, training a classifier on masked logits, and checkpointing only the trainable model state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.config import OptimConfig
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.divergence import DivergenceGuard
from norga.runtime.optim import build_optimizer, schedule_factor, set_epoch_lr

NEG_INF = float("-inf")


def masked_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Logits with every class outside the boolean mask `allowed` set to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), NEG_INF)


class PhaseTraining:
    """Mixin for methods whose phases train with an optimizer; needs ``self.model`` (a `PromptedViT`) and
    ``self.ctx`` (the `RunContext`).

    Data-parallel phases (the default) train on this process's shard of each batch with a loss that is its
    share of the whole batch's (`RunContext.batch_mean`, `replicated_term`); `_step` sums the gradients over
    processes. Replicated phases (``sharded=False``: every process draws the same samples, e.g. TAP on
    Gaussian features) skip that.
    """

    model: nn.Module
    ctx: RunContext
    optimizer: torch.optim.Optimizer | None = None
    _saved_optimizer: dict | None = None
    _guard: DivergenceGuard | None = None

    def _phase_optimizer(self, groups: list[dict], cfg: OptimConfig, start_epoch: int) -> None:
        """A fresh optimizer for a phase (the official code re-creates it every task); when resuming
        mid-phase, it gets the interrupted phase's saved state back, with the learning rates of the current
        config (a resume may lower them)."""
        self.optimizer = build_optimizer(groups, cfg)
        self._guard = DivergenceGuard()
        saved, self._saved_optimizer = self._saved_optimizer, None
        if start_epoch > 0:
            if saved is None:
                raise ValueError("resuming mid-phase needs the optimizer state, but the checkpoint has none")
            saved = dict(saved)
            self._guard.load_state_dict(saved.pop("divergence", None))
            base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(saved)
            for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
                group["base_lr"] = base_lr

    def _step(self, loss: Tensor, params: Iterable[Tensor], cfg: OptimConfig, sharded: bool = True) -> Tensor:
        """One optimizer step; returns the detached loss (no host sync: finiteness is checked per epoch)."""
        params = list(params)
        self._guard.observe(loss, params)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sharded:
            self.ctx.dist.sum_gradients(params)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _end_epoch(
        self, epoch: int, total: Tensor | float, cfg: OptimConfig, on_epoch_end: Callable[[int, dict], None],
        sharded: bool = True, lr_key: str = "the learning rate",
    ) -> None:
        """Refuse a diverged epoch (`DivergenceGuard`; `lr_key` names the learning rate setting that drives this
        phase) before anything is checkpointed, then report the epoch."""
        total = float(self.ctx.dist.all_sum(total) if sharded else total)
        self._guard.check(total, lr_key, cfg.lr, epoch, self.ctx.dist if sharded else None)
        on_epoch_end(epoch, {"loss": total, **self._epoch_lr()})

    def _epoch_lr(self) -> dict[str, float | list[float]]:
        """The learning rate the epoch ran at (``lr``; one per parameter group where the groups' differ)."""
        if self.optimizer is None:
            return {}
        rates = [float(group["lr"]) for group in self.optimizer.param_groups]
        return {"lr": rates[0] if len(set(rates)) == 1 else rates}

    def _fit_classifier(
        self,
        classifier: nn.Module,
        batches: Callable[[int], Iterable[TrainBatch]],
        allowed: Tensor,
        cfg: OptimConfig,
        start_epoch: int,
        on_epoch_end: Callable[[int, dict], None],
        lr_key: str,
    ) -> None:
        """Train `classifier` with cross-entropy on logits masked to `allowed` over ``batches(epoch)`` (of inputs);
        `lr_key` is the dotted config key of ``cfg.lr``."""
        params = list(classifier.parameters())
        classifier.train()
        self._phase_optimizer([{"params": params}], cfg, start_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch_lr(self.optimizer, schedule_factor(cfg.schedule, epoch, cfg.epochs, cfg.lr))
            total = 0.0
            for batch in batches(epoch):
                logits = masked_logits(classifier(batch.images), allowed)
                loss = self.ctx.batch_mean(F.cross_entropy(logits, batch.labels, reduction="none"), batch)
                total += self._step(loss, params, cfg)
            self._end_epoch(epoch, total, cfg, on_epoch_end, lr_key=lr_key)
        classifier.eval()

    # ------------------------------------------------------------------- state
    def _optimizer_state(self) -> dict | None:
        """The current phase's optimizer state; before a resumed method has run a phase, the state it loaded
        (so a checkpoint written then, e.g. at a task's commit, equals the one an uninterrupted run writes)."""
        if self.optimizer is None:
            return self._saved_optimizer
        return {**self.optimizer.state_dict(), "divergence": self._guard.state_dict()}

    def _trainable_model_state(self) -> dict[str, Tensor]:
        """The model's state without the frozen backbone weights (those are the pre-trained file)."""
        return {k: v for k, v in self.model.state_dict().items() if not self._frozen_key(k)}

    def _load_trainable_model_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._frozen_key(k)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")

    @staticmethod
    def _frozen_key(key: str) -> bool:
        """Backbone weights are not checkpointed (they are the pre-trained file, recorded by checksum)."""
        return key.startswith("backbone.") and not key.startswith(("backbone.head.", "backbone.fc_norm."))

    def _model_and_optimizer_state(self) -> dict[str, Any]:
        return {"model": self._trainable_model_state(), "optimizer": self._optimizer_state()}
