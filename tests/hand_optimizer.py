"""Optimizer steps and learning-rate schedules written out by hand, as the official code runs them.

Adam (betas 0.9/0.999, eps 1e-8 unless given, L2 weight decay added to the gradient) and SGD (momentum 0.9 unless
given, dampening 0, the first step's buffer the gradient itself), after clipping the global gradient norm to `clip`
(scale ``clip / (norm + 1e-6)`` when below 1). Learning rate of epoch e: base lr times the schedule's factor, where
the official code steps its timm scheduler with the epoch index after each epoch (epoch 0 trains at the
base lr), and CODA-Prompt's own schedule is ``cos(99π·e / (200·(epochs−1)))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA1, BETA2, ADAM_EPS, SGD_MOMENTUM, CLIP_EPS = 0.9, 0.999, 1e-8, 0.9, 1e-6
COSINE_MIN_LR = 1e-5  # timm CosineLRScheduler's lr_min in the official configs


def epoch_lr(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The learning rate epoch `epoch` (0-based) of `epochs` trains with."""
    if epoch == 0 or schedule == "constant":
        return lr
    if schedule == "coda_cosine":
        return lr * math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
    t = epoch - 1  # the scheduler's value after epoch e-1
    if schedule == "cosine":
        return COSINE_MIN_LR + 0.5 * (lr - COSINE_MIN_LR) * (1 + math.cos(math.pi * t / epochs)) if t < epochs else COSINE_MIN_LR
    if schedule == "step":
        return lr * 0.1 ** (t // 30)
    raise ValueError(schedule)


class HandOptimizer:
    """Adam or SGD over named tensors, one step at a time; a tensor with no gradient (None) is left alone."""

    def __init__(self, kind: str, weight_decay: float, clip: float | None, momentum: float = SGD_MOMENTUM,
                 betas: tuple[float, float] = (BETA1, BETA2), eps: float = ADAM_EPS) -> None:
        self.kind, self.weight_decay, self.clip = kind, weight_decay, clip
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.state: dict[str, dict[str, Tensor]] = {}
        self.steps = 0
        self.clip_scales: list[float] = []
        self.last_gradients: dict[str, Tensor] = {}  # the last step's, after clipping and weight decay

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor | None], lr: float) -> dict[str, Tensor]:
        """The new values of `params` after one step with `grads` at learning rate `lr`."""
        grads = {name: g for name, g in grads.items() if g is not None}
        if self.clip is not None:
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
            scale = min(1.0, self.clip / (norm + CLIP_EPS))
            self.clip_scales.append(scale)
            grads = {name: g * scale for name, g in grads.items()}
        self.steps += 1
        new = dict(params)
        self.last_gradients = {name: grad + self.weight_decay * params[name] for name, grad in grads.items()}
        for name, g in self.last_gradients.items():
            p = params[name]
            state = self.state.setdefault(name, {})
            if self.kind == "sgd":
                state["buffer"] = g.clone() if "buffer" not in state else self.momentum * state["buffer"] + g
                new[name] = p - lr * state["buffer"]
            else:
                beta1, beta2 = self.betas
                state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
                state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
                m_hat = state["m"] / (1 - beta1**self.steps)
                v_hat = state["v"] / (1 - beta2**self.steps)
                new[name] = p - lr * m_hat / (torch.sqrt(v_hat) + self.eps)
        return new
