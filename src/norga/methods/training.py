"""What gradient-trained methods share: a fresh optimizer per phase (resumable mid-phase), one optimizer
step, the end-of-epoch finiteness check, and training a classifier on masked logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.config import OptimConfig
from norga.engine.optim import build_optimizer, schedule_factor, set_epoch_lr
from norga.methods.base import ContinualMethod

NEG_INF = float("-inf")


def masked_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Logits with every class outside the boolean mask `allowed` set to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), NEG_INF)


class TrainedMethod(ContinualMethod):
    """A method whose phases train with an optimizer that is re-created per phase (as the official code does)."""

    optimizer: torch.optim.Optimizer | None = None
    _saved_optimizer: dict | None = None  # restored into the next phase's optimizer when resuming mid-phase

    def _phase_optimizer(self, groups: list[dict], cfg: OptimConfig, start_epoch: int) -> None:
        """A fresh optimizer for a phase; when resuming mid-phase, it gets the interrupted phase's saved state back."""
        self.optimizer = build_optimizer(groups, cfg)
        saved, self._saved_optimizer = self._saved_optimizer, None
        if start_epoch > 0:
            if saved is None:
                raise ValueError("resuming mid-phase needs the optimizer state, but the checkpoint has none")
            self.optimizer.load_state_dict(saved)

    def _optimizer_state(self) -> dict[str, Any] | None:
        return self.optimizer.state_dict() if self.optimizer is not None else None

    def _step(self, loss: Tensor, params, cfg: OptimConfig) -> Tensor:
        """One optimizer step; returns the detached loss (no host sync: finiteness is checked per epoch)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        self.optimizer.step()
        return loss.detach()

    @staticmethod
    def _end_epoch(epoch: int, total: Tensor | float, cfg: OptimConfig, on_epoch_end) -> None:
        """Refuse a non-finite epoch loss before anything is checkpointed, then report the epoch."""
        total = float(total)
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(
                f"training loss became {total}: lower the learning rate (now {cfg.lr}) or check the data; "
                "the last good checkpoint is intact"
            )
        on_epoch_end(epoch, {"loss": total})

    def _fit_classifier(
        self,
        classifier: nn.Module,
        batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
        allowed: Tensor,
        cfg: OptimConfig,
        start_epoch: int,
        on_epoch_end: Callable[[int, dict], None],
    ) -> None:
        """Train `classifier` with cross-entropy on logits masked to `allowed` over ``batches(epoch)``."""
        params = list(classifier.parameters())
        classifier.train()
        self._phase_optimizer([{"params": params}], cfg, start_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch_lr(self.optimizer, schedule_factor(cfg.schedule, epoch, cfg.epochs, cfg.lr))
            total = 0.0
            for inputs, labels in batches(epoch):
                loss = F.cross_entropy(masked_logits(classifier(inputs), allowed), labels)
                total += self._step(loss, params, cfg)
            self._end_epoch(epoch, total, cfg, on_epoch_end)
        classifier.eval()
