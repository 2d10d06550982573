"""VPT-NSP²'s settings (section ``vptnsp:``); defaults are the paper's (10-split CIFAR-100), the official code's
departures are compat switches (`VPTNSPSettings.official_lr_drops`, `official_head_init`, and in ``null_space``
the adaptive cut, the Frobenius normalisation and the per-batch means)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from norga.config import ConfigError, Count, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Temperature
from norga.methods.nsp.null_space import NullSpaceSettings

#: How much earlier the official code drops the lr: timm's scheduler stepped with t + 1 applies each milestone one
#: code epoch (a tenth of the 10 code epochs) early (spec §6.2, §9 #1).
OFFICIAL_DROP_SHIFT = 0.1


@dataclass
class NSPTrainConfig:
    """Prompts and the current task's head: Adam with coupled L2 weight decay whose prompt steps are projected
    (`norga.runtime.projected_adam.ProjectedAdam`; plain Adam while no task has statistics), the lr ×0.1 from each
    fraction `lr_drops` of the epochs on, no clipping (fixed, below)."""

    epochs: Count = 100  # passes over the task's images (the official 10 epochs of 10 repeats each)
    lr: PositiveFloat = 0.01
    batch_size: PositiveInt = 256
    weight_decay: NonNegativeFloat = 5e-5  # coupled L2 (torch Adam's), on prompts and head
    lr_drops: list[Fraction] = field(default_factory=lambda: [0.5, 0.8])  # ×0.1 from these fractions of the epochs
    betas: list[Fraction] | None = None  # [β1, β2] below 1; None: [0.9, 0.999]
    eps: PositiveFloat | None = None  # None: 1e-8

    # fixed, not settings: the official optimizer (SGD's knob none)
    optimizer: ClassVar[str] = "projected_adam"
    schedule: ClassVar[str] = "multistep"
    clip_grad: ClassVar[float | None] = None
    momentum: ClassVar[float | None] = None

    def check(self, section: str) -> None:
        if self.betas is not None and (len(self.betas) != 2 or max(self.betas) >= 1.0):
            raise ConfigError(f"{section}.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")


@dataclass
class VPTNSPSettings:
    """VPT-NSP²'s settings (section ``vptnsp:``): shared VPT-deep prompts, one head per task, null-space projection."""

    prompt_length: PositiveInt = 4  # M prompts per block
    layers: list[Count] = field(default_factory=lambda: list(range(12)))  # prompted blocks (official: all 12)
    prompt_init: Literal["uniform", "zero"] = "uniform"  # uniform: U(-1, 1) (official default)
    temperature: Temperature = 28.0  # the CE's logits / τ (official: 28, 25, 30, 30 by benchmark)
    ln_loss_weight: NonNegativeFloat = 1.0  # λ of the L1 loss on each prompt's mean and std (Eq. 27, code's scale)
    statistics_batch_size: PositiveInt = 100  # the statistics pass's batches (they weigh alike with per_batch_mean)
    null_space: NullSpaceSettings = field(default_factory=NullSpaceSettings)
    train: NSPTrainConfig = field(default_factory=NSPTrainConfig)
    official_lr_drops: bool = False  # compat: each lr drop a tenth of the epochs earlier (timm's t + 1, §6.2)
    #: compat: task 2's head starts as task 1's trained head and later heads get torch's default Linear init (the
    #: official head reuse, §2.3); false: every head starts fresh (truncated normal σ 0.02, zero bias)
    official_head_init: bool = False

    def check(self, section: str) -> None:
        if not self.layers:
            raise ConfigError(f"{section}.layers is empty: VPT-NSP² needs prompted blocks, e.g. --set "
                              f"{section}.layers=[0,1,2,3,4,5,6,7,8,9,10,11]")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{section}.layers lists a block twice: {self.layers}")
