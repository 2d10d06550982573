"""HiDe-Prompt's and NoRGa's settings (sections ``hide:`` and ``norga:``); defaults are the official CIFAR-100
Sup-21K script's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from norga.config import (
    ConfigError,
    Count,
    Fraction,
    NonNegativeFloat,
    OptimConfig,
    PositiveFloat,
    PositiveInt,
    Temperature,
)
from norga.methods.ranpac.ridge_head import RidgeSettings
from norga.nn.gates import GateTrainTasks, ScoreGateKind
from norga.nn.prefix_reparam import PrefixParam


@dataclass
class TAPConfig:
    """Task-adaptive prediction: a classifier retrained on Gaussian samples of all seen classes' features, with the
    official optimizer: SGD with momentum and torch's cosine annealing, no clipping, no weight decay (fixed, below)."""

    epochs: Count = 30
    lr: PositiveFloat = 0.005
    samples_per_class: PositiveInt = 640  # per class and epoch, also the size of a batch (official)
    momentum: Fraction = 0.9  # SGD's
    official_chunking: bool = True  # NORGA_SPEC P16: use only |C_<t| chunks per epoch

    # fixed, not settings: the official TAP's optimizer (Adam's knobs none)
    optimizer: ClassVar[str] = "sgd"
    schedule: ClassVar[str] = "cosine_annealing"
    clip_grad: ClassVar[float | None] = None
    weight_decay: ClassVar[float] = 0.0
    betas: ClassVar[list[float] | None] = None
    eps: ClassVar[float | None] = None


@dataclass
class TaskPromptSettings:
    """The per-task prefix prompts: length, prompted blocks, HiDe-Prompt's prompt momentum and sequential init, and
    how a slot is parameterized while it trains."""

    length: Count = 5  # 0: the same pipeline without prompts (prompt training trains the head alone)
    layers: list[Count] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    momentum: Fraction = 0.01
    #: raw: the slot's keys and values train; mlp: they are produced by the task's own embeddings and MLP
    #: (Linear(D, 48), Tanh, Linear(48, 2D)) and folded into a plain slot at the task's end
    param: PrefixParam = "raw"
    sequential_init: bool = True  # official: task t's slot starts as slot t-1 (mlp: from task t-1's MLP)

    def check(self, section: str) -> None:
        """A reparameterization needs prompts to produce (checked at config load)."""
        if self.param == "mlp" and self.length == 0:
            raise ConfigError(f"{section}.param=mlp has no prompts to produce with {section}.length=0: set "
                              f"{section}.length to 1 or more, or {section}.param=raw")


@dataclass
class TIISettings:
    """Task-identity inference model: frozen features -> residual MLP -> head (``head mlp``, official), or RanPAC's
    ridge head on random ReLU features, whose class scores summed over each task's classes score the tasks
    (``head ranpac``: no training, no class statistics, no task-adaptive stage; its settings in ``ranpac``)."""

    head: Literal["mlp", "ranpac"] = "mlp"  # mlp: official; ranpac: RanPAC's ridge head, tasks by summed class scores
    ranpac: RidgeSettings = field(default_factory=RidgeSettings)
    mlp_hidden: list[PositiveInt] = field(default_factory=lambda: [2])
    augment: bool = True  # official: fresh augmented views each epoch; False trains on cached frozen features
    train: OptimConfig = field(default_factory=OptimConfig)
    tap: TAPConfig = field(default_factory=lambda: TAPConfig(lr=0.0025, samples_per_class=128))


@dataclass
class WTPSettings:
    """Within-task prompt training (and the prompted model's TAP)."""

    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=50, lr=0.015, schedule="step"))
    head_lr_scale: PositiveFloat = 0.1  # official --larger_prompt_lr: head lr = 0.1 x prompt lr
    contrastive_weight: NonNegativeFloat = 0.1  # official --reg
    contrastive_temperature: Temperature = 0.8
    tap: TAPConfig = field(default_factory=TAPConfig)


@dataclass
class HiDeSettings:
    """HiDe-Prompt's settings (section ``hide:``); defaults are the official CIFAR-100 Sup-21K script's."""

    prompt: TaskPromptSettings = field(default_factory=TaskPromptSettings)
    tii: TIISettings = field(default_factory=TIISettings)
    wtp: WTPSettings = field(default_factory=WTPSettings)
    prefix_layout: Literal["correct", "official"] = "correct"  # official: the reshape that mixes samples (§1.6)
    batchwise_prompt: bool = False  # official majority vote of the task id per test batch (P2), compat only
    #: with batchwise_prompt: task-identity accuracy counts each image's own predicted task (own) or, as the
    #: official code does, the batch's voted slot it was prompted with (voted)
    task_identity_counts: Literal["own", "voted"] = "own"
    #: prompted class statistics from sequential mixed-class batches of eval.batch_size (eval), or, as the
    #: official code does, from each class's images alone in shuffled batches of wtp.train.batch_size
    #: (official; with prefix_layout=official a sample's features depend on its place in the batch)
    class_stats_batches: Literal["eval", "official"] = "eval"
    cache_prompted_features: bool = True  # memoise prompted test features per (image, slot); correct layout only


@dataclass
class NoRGaSettings(HiDeSettings):
    """NoRGa's settings (section ``norga:``): HiDe-Prompt's plus the gate ``s + α·σ(τ·s)`` on prompt scores."""

    gate: ScoreGateKind = "tanh"  # σ, a registered gate kind (norga.nn.gates.GATE_KINDS)
    gate_train_tasks: GateTrainTasks = "first"  # official: α, τ trained on the first task only

    def check(self, section: str) -> None:
        """A gate needs prompt scores: the pipeline without prompts is HiDe-Prompt's (checked at config load)."""
        if self.prompt.length == 0:
            raise ConfigError(f"{section}.prompt.length=0 leaves no prompt scores for the gate to act on: for the "
                              "pipeline without prompts use --set method=hide --set hide.prompt.length=0")
