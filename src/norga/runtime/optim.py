"""Optimisers and learning-rate schedules as the official code steps them, as pure functions of the epoch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch

from norga.config import ADAM_BETAS, ADAM_EPS, SGD_MOMENTUM
from norga.runtime.projected_adam import ProjectedAdam

SCHEDULES = ("constant", "step", "cosine", "coda_cosine", "cosine_annealing")
STEP_DECAY_EPOCHS, STEP_DECAY_RATE, COSINE_MIN_LR = 30, 0.1, 1e-5


class PhaseOptimization(Protocol):
    """What a training phase's settings give its loop: `norga.config.OptimConfig`, or a section that fixes some of
    these as class constants (e.g. HiDe-Prompt's TAP: SGD with torch's cosine annealing)."""

    epochs: int
    lr: float
    optimizer: str
    schedule: str
    clip_grad: float | None
    weight_decay: float
    momentum: float | None
    betas: list[float] | None
    eps: float | None


def schedule_factor(schedule: str, epoch: int, epochs: int, base_lr: float) -> float:
    """Multiplier of the base lr for 0-based `epoch`.

    The official code steps timm's scheduler with the epoch index *after* each epoch, so epoch e trains
    with the value for e-1 (epoch 0 with the base lr): a 'step' decay starts at epoch 31. 'coda_cosine' is
    CODA-Prompt's own schedule, ``cos(99π·e / (200·(epochs−1)))`` at epoch e (down to ≈1.6 % at the last);
    'cosine_annealing' is torch's CosineAnnealingLR (`cosine_annealing_factor`, HiDe-Prompt's TAP).
    """
    if schedule == "constant" or epoch == 0:
        return 1.0
    if schedule == "coda_cosine":
        return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
    if schedule == "cosine_annealing":
        return cosine_annealing_factor(epoch, epochs)
    t = epoch - 1
    if schedule == "step":
        return STEP_DECAY_RATE ** (t // STEP_DECAY_EPOCHS)
    if schedule == "cosine":
        if t >= epochs:
            return COSINE_MIN_LR / base_lr
        lr = COSINE_MIN_LR + 0.5 * (base_lr - COSINE_MIN_LR) * (1 + math.cos(math.pi * t / epochs))
        return lr / base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULES}")


def cosine_annealing_factor(epoch: int, epochs: int) -> float:
    """torch's CosineAnnealingLR (eta_min 0) stepped once per epoch: the TAP schedule."""
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def cosine_iteration_lr(step: int, total: int, base_lr: float, final_lr: float = 1e-6, freeze: int = 0,
                        freeze_lr: float = 1e-6) -> float:
    """The lr of 0-based iteration `step` in VQ-Prompt's and SMoPE's per-iteration schedule (``coswm``): `freeze`
    iterations at `freeze_lr`, then a cosine from `base_lr` to `final_lr` over the rest of `total` iterations, then
    `final_lr`."""
    if step >= total:
        return final_lr
    if step < freeze:
        return freeze_lr
    done, length = step - freeze, total - freeze
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * done / length))


def build_optimizer(groups: Iterable[dict], config: PhaseOptimization) -> torch.optim.Optimizer:
    """Adam, AdamW, SGD or ``projected_adam`` (`ProjectedAdam`: Adam whose steps can be projected per named parameter;
    its groups carry ``param_names``) over parameter groups, every knob from `config` (a knob left at None: its
    standard value); each group may carry ``lr_scale`` (e.g. 0.1 for the head)."""
    groups = [dict(group, lr=config.lr * group.get("lr_scale", 1.0)) for group in groups if group["params"]]
    for group in groups:
        group.setdefault("lr_scale", 1.0)
        group["base_lr"] = group["lr"]
    if config.optimizer in ("adam", "adamw", "projected_adam"):  # adamw: decoupled weight decay
        betas = ADAM_BETAS if config.betas is None else tuple(config.betas)
        eps = ADAM_EPS if config.eps is None else config.eps
        adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "projected_adam": ProjectedAdam}[config.optimizer]
        return adam(groups, lr=config.lr, betas=betas, eps=eps, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        momentum = SGD_MOMENTUM if config.momentum is None else config.momentum
        return torch.optim.SGD(groups, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'adam', 'adamw', 'sgd' or 'projected_adam'")


def multistep_factor(epoch: int, drop_epochs: Iterable[int], rate: float = 0.1) -> float:
    """`rate` to the number of `drop_epochs` at or before 0-based `epoch` (a multi-step schedule by drop epochs)."""
    return rate ** sum(epoch >= drop for drop in drop_epochs)


def set_epoch_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its base lr times `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
