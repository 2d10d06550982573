"""Typed run configuration: nested dataclasses, one per concern, written and read as YAML.

Learning rates here are the *effective* ones (the official scripts' ``lr · batch/256`` already
applied), so a preset says exactly what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: σ of the NoRGa gate (norga.nn.gates.ACTIVATIONS implements exactly these; kept here so configs load without torch).
GATE_ACTIVATIONS = ("tanh", "sigmoid", "gelu", "relu", "softplus", "elu", "identity")


@dataclass
class DataConfig:
    """Which continual benchmark and how its data is read."""

    benchmark: str = "cifar100"
    root: str | None = None  # else $NORGA_DATA, else a download when allowed
    num_tasks: int | None = None  # None: the benchmark's own number of tasks
    normalization: str = "backbone"  # backbone | official (NORGA_SPEC P7)
    train_per_class: int | None = None  # subsample the training set (quick runs)
    test_per_class: int | None = None  # subsample the test set (quick runs; reported in the run record)
    workers: int = 0
    download: bool = False
    fiveds_transform_carryover: bool = False  # official bug P6, compat only
    joint: bool = False  # upper bound: train once on the union of all tasks, test on each task (engine/joint.py)


@dataclass
class BackboneConfig:
    """The pre-trained ViT: a registry name or any timm model name, and where its weights come from."""

    name: str = "sup21k"
    weights: str = "hub"  # hub | none | a local file path
    timm_kwargs: dict = field(default_factory=dict)


@dataclass
class PromptConfig:
    """Prefix prompts and the score gate (gate None = HiDe-Prompt)."""

    length: int = 5
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    gate: str | None = "tanh"
    gate_train_tasks: str = "first"  # first (official) | all | none
    momentum: float = 0.01
    prefix_layout: str = "correct"  # correct | official (NORGA_SPEC §1.6)
    attention_impl: str = "fused"  # fused | reference


@dataclass
class OptimConfig:
    """One gradient-training phase."""

    epochs: int = 20
    lr: float = 0.00025
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "constant"  # constant | step (x0.1 every 30 epochs) | cosine (to 1e-5)
    clip_grad: float | None = 1.0
    weight_decay: float = 0.0


@dataclass
class TAPConfig:
    """Task-adaptive prediction: a head retrained on Gaussian samples of all seen classes' features."""

    epochs: int = 30
    lr: float = 0.005
    samples_per_class: int = 640
    momentum: float = 0.9
    official_chunking: bool = True  # NORGA_SPEC P16: use only |C_<t| chunks per epoch


@dataclass
class TIIConfig:
    """Task-identity inference model: frozen features -> residual MLP -> head."""

    mlp_hidden: list[int] = field(default_factory=lambda: [2])
    augment: bool = True  # official: fresh augmented views each epoch; False trains on cached frozen features
    train: OptimConfig = field(default_factory=OptimConfig)
    tap: TAPConfig = field(default_factory=lambda: TAPConfig(lr=0.0025, samples_per_class=128))


@dataclass
class WTPConfig:
    """Within-task prompt training (and the prompted model's TAP)."""

    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=50, lr=0.015, schedule="step"))
    head_lr_scale: float = 0.1  # official --larger_prompt_lr: head lr = 0.1 x prompt lr
    contrastive_weight: float = 0.1  # official --reg
    contrastive_temperature: float = 0.8
    tap: TAPConfig = field(default_factory=TAPConfig)


@dataclass
class LinearProbeConfig:
    """Lower bound `linear_probe`: a linear head over all classes on frozen features, trained task after task."""

    augment: bool = False  # True: freshly augmented views through the frozen backbone each epoch; False: cached
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=10, lr=0.01, batch_size=64))


@dataclass
class NCMConfig:
    """Lower bound `ncm`: nearest class mean of frozen features."""

    metric: str = "cosine"  # cosine (means of L2-normalised features) | euclidean


@dataclass
class EvalConfig:
    """Evaluation and the compat switches that change it."""

    batch_size: int = 128
    batchwise_prompt: bool = False  # official majority vote of the task id per batch (P2), compat only
    mask_final_logits: bool = True  # argmax over seen classes; False = official, over all classes (P17)


@dataclass
class RunConfig:
    """Everything one run needs; `norga run` resolves a preset plus overrides into this."""

    method: str = "norga"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    tii: TIIConfig = field(default_factory=TIIConfig)
    wtp: WTPConfig = field(default_factory=WTPConfig)
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    ncm: NCMConfig = field(default_factory=NCMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: str = "none"  # none | bf16
    cache_frozen_features: bool = True
    cache_features_on_disk: bool = False  # keep them in the run directory too (a resume needs no recompute)
    output_dir: str = "runs"
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
