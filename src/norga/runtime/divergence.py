"""Divergence of a training phase, caught at the end of an epoch before anything is checkpointed.

A phase has diverged when its epoch's mean loss is not finite, when a trainable weight is not finite, or when
the mean loss has grown more than `GROWTH_LIMIT` times above its start (the loss of the phase's first batch,
before any step; at least 1, so a start near 0 does not make noise look like growth). A step size that fits
lowers the loss or holds it; a thousandfold rise means the steps overshoot, although every value is still
finite and would be checkpointed as good. The error names the setting to change, which the caller gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from norga.runtime.distributed import Distributed

GROWTH_LIMIT = 1e3


class TrainingDiverged(FloatingPointError):
    """Training diverged; `setting` is the dotted config key of the learning rate that drove it."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class DivergenceGuard:
    """One phase's reference loss and batch count (no host sync per step: the loss stays a tensor until the
    epoch ends). Its state rides with the optimizer's, so a phase resumed mid-way keeps its reference."""

    def __init__(self) -> None:
        self.reference: Tensor | float | None = None
        self.batches = 0
        self.params: Sequence[Tensor] = ()

    def observe(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """Called with each step's loss, before the step."""
        if self.reference is None:
            self.reference = loss.detach()
        self.batches += 1
        self.params = params

    def check(self, total: float, setting: str, value: float, epoch: int, dist: Distributed | None) -> None:
        """Raise `TrainingDiverged` if the epoch whose losses sum to `total` diverged; `dist` sums this
        process's share of the reference loss over processes (None: every process computed the whole loss)."""
        if isinstance(self.reference, Tensor):
            self.reference = float(dist.all_sum(self.reference) if dist is not None else self.reference)
        mean, self.batches = total / max(self.batches, 1), 0
        advice = f"lower {setting} (now {value:g})"
        if not math.isfinite(mean):
            raise TrainingDiverged(f"training loss became {mean} in epoch {epoch + 1}: {advice} or check the data",
                                   setting)
        if self.params and not bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all()):
            raise TrainingDiverged(f"trainable weights became non-finite in epoch {epoch + 1}: {advice}", setting)
        start = self.reference if self.reference is not None else mean
        if mean > GROWTH_LIMIT * max(abs(start), 1.0):
            raise TrainingDiverged(f"training diverged in epoch {epoch + 1}: the mean loss {mean:.4g} is over "
                                   f"{GROWTH_LIMIT:g} times its start ({start:.4g}): {advice}", setting)

    def state_dict(self) -> dict:
        return {"reference": None if self.reference is None else float(self.reference)}

    def load_state_dict(self, state: dict | None) -> None:
        self.reference = (state or {}).get("reference")
