"""SMoPE's settings (section ``smope:``); defaults are the official CIFAR-100 script's (SMOPE_REPARAM_SPEC A8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from norga.config import ConfigError, Count, NonNegativeFloat, PositiveFloat, PositiveInt


@dataclass
class SMoPEOptim:
    """A training phase of SMoPE: AdamW over two groups (the experts at ``prompt_lr_scale`` x lr, the head at lr),
    no gradient clipping, the official schedules."""

    epochs: Count = 20
    lr: PositiveFloat = 0.005  # the head's; the experts train at prompt_lr_scale x this
    batch_size: PositiveInt = 128
    schedule: Literal["coswm", "coda_cosine"] = "coswm"  # coswm: per iteration (freeze_iters at 1e-6, then a cosine down to 1e-6); coda_cosine: per epoch (CUB)
    freeze_iters: Count = 80  # coswm: the first iterations at lr 1e-6
    weight_decay: NonNegativeFloat = 0.0

    # fixed, not settings: the official optimizer (AdamW, no clipping; Adam's knobs at their defaults)
    optimizer: ClassVar[str] = "adamw"
    clip_grad: ClassVar[float | None] = None
    momentum: ClassVar[float | None] = None
    betas: ClassVar[list[float] | None] = None
    eps: ClassVar[float | None] = None


@dataclass
class AlignmentConfig:
    """Classifier alignment after task t > 0: the head retrained on draws from each seen class's Gaussian (mean and
    per-dimension variance + 1e-4) with AdamW and a per-iteration cosine from lr down to 1e-6."""

    epochs: Count = 50  # official crct_epochs
    lr: PositiveFloat = 1e-5  # where the cosine starts (the official ca_lr / 10)
    samples_per_class: PositiveInt = 128  # per class and epoch, also the batch size (batch x ca_batch_size_ratio)
    weight_decay: NonNegativeFloat = 5e-4
    official_chunking: bool = True  # only |C<t| batches of the draws per epoch, as the official code

    optimizer: ClassVar[str] = "adamw"
    schedule: ClassVar[str] = "constant"
    clip_grad: ClassVar[float | None] = None
    momentum: ClassVar[float | None] = None
    betas: ClassVar[list[float] | None] = None
    eps: ClassVar[float | None] = None


@dataclass
class SMoPESettings:
    """SMoPE: one pool of prefix experts shared by every task, each sample routed to its top-K per head. Sections:
    `warmup` (task 0's dense warm-up on every expert, cross-entropy only; 0 epochs: none), `train` (top-K
    training), `alignment` (classifier alignment after each task but the first)."""

    layers: list[Count] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # prompted blocks
    num_experts: PositiveInt = 25  # per block and head: length-1 key/value prefixes in head space
    top_k: PositiveInt = 5  # experts each sample attends to, per block and head
    alpha_router: NonNegativeFloat = 1e-5  # router loss weight
    alpha_proto: NonNegativeFloat = 1e-5  # prototype loss weight (tasks after the first)
    noise: NonNegativeFloat = 0.4  # ε: the training penalty of frequently used experts, times the score range
    router_margin: bool = True  # router loss: unselected experts' logits raised by ε x range (code); false: the poster's plain CE
    usage_threshold: Literal["mean_nonzero", "mean_all"] = "mean_nonzero"  # "frequently used": count >= mean of the non-zero counts (code) or of all (poster)
    unused_eval_penalty: NonNegativeFloat = 2.0  # evaluation: never-used experts' penalty x range (0: no exclusion)
    prompt_lr_scale: PositiveFloat = 5.0  # experts' lr over the head's (official "larger prompt lr")
    warmup: SMoPEOptim = field(default_factory=lambda: SMoPEOptim(epochs=10))
    train: SMoPEOptim = field(default_factory=SMoPEOptim)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    official_iter_step: PositiveInt | None = None  # compat: the script's iter_step as coswm's iterations per epoch (None: the true number)
    official_first_step: bool = False  # compat: every phase's first iteration at the optimizer's constructed lr (training: the base lr; alignment: 10 x lr)
    official_reload_evaluation: bool = False  # compat: evaluate as the official reload does (usage counts lost, never-used experts not excluded)

    def check(self, section: str) -> None:
        if self.top_k > self.num_experts:
            raise ConfigError(f"{section}.top_k = {self.top_k} is more than {section}.num_experts = "
                              f"{self.num_experts}: set --set {section}.top_k={self.num_experts} or fewer")
        if not self.layers:
            raise ConfigError(f"{section}.layers is empty: give the prompted blocks, e.g. --set {section}.layers=[0,1]")
