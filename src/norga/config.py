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
    skip_unreadable: bool = False  # leave out undecodable image files (counted in environment.json) instead of failing
    memory_budget_mb: int = 2048  # image-file datasets whose pixels fit are decoded once into memory; 0: on access
    split_manifest: str | None = None  # imagenet-r: a split manifest file (default: the shipped / generated one)
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
class KeyedPromptConfig:
    """L2P / DualPrompt / S-Prompt++: prompts picked by key–query cosine similarity on the frozen CLS feature.

    Defaults per method section follow the official DualPrompt-family configs (NORGA_SPEC §1.8). Layers
    beyond the backbone's depth are dropped with a warning.
    """

    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=20, lr=0.0025))
    pool_size: int | None = None  # None: top_k slots per task
    top_k: int = 1
    length: int = 20  # per slot (prefix: key and value vectors each)
    layers: list[int] = field(default_factory=lambda: [2, 3, 4])  # E-prompt blocks
    prompt_type: str = "prefix"  # prefix (prefix tuning) | tokens (prompt tuning: tokens prepended before CLS)
    train_selection: str = "task"  # task: slots of the current task (DualPrompt, S-Prompt++) | similarity (L2P)
    sequential_init: bool = True  # the official shared_prompt_pool: task t's slots start as task t-1's
    pull_weight: float = 1.0  # pull constraint λ
    g_length: int = 0  # G-prompt (a prefix shared by all tasks) length; 0 = none
    g_layers: list[int] = field(default_factory=list)
    gate: str | None = None  # a NoRGa gate on every prefix layer; None = plain prefix tuning
    gate_train_tasks: str = "first"


def _l2p() -> KeyedPromptConfig:
    return KeyedPromptConfig(train=OptimConfig(epochs=10, lr=0.0025), pool_size=30, top_k=5, length=5, layers=[0],
                             prompt_type="tokens", train_selection="similarity", sequential_init=False, pull_weight=0.1)


def _dualprompt() -> KeyedPromptConfig:
    return KeyedPromptConfig(g_length=5, g_layers=[0, 1])


def _sprompt() -> KeyedPromptConfig:
    return KeyedPromptConfig(layers=[0, 1, 2, 3, 4])


@dataclass
class CodaConfig:
    """CODA-Prompt (GT-RIPL/CODA-Prompt): M components per layer split evenly over the tasks, weighted by
    attention to the frozen CLS query. Adam lr 0.001, CODA's cosine schedule, no clipping, batch 128."""

    train: OptimConfig = field(
        default_factory=lambda: OptimConfig(epochs=20, lr=0.001, schedule="coda_cosine", clip_grad=None))
    pool_size: int = 100  # components per layer (M)
    length: int = 8  # per component: first half key prefix, second half value prefix
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    ortho_weight: float = 0.0  # orthogonality penalty μ (CODA's scripts: 0.0 with Gram-Schmidt re-init)
    gate: str | None = None
    gate_train_tasks: str = "first"


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
    # official majority vote of the task id / prompts per batch (P2; L2P votes while training too), compat only
    batchwise_prompt: bool = False
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
    l2p: KeyedPromptConfig = field(default_factory=_l2p)
    dualprompt: KeyedPromptConfig = field(default_factory=_dualprompt)
    sprompt: KeyedPromptConfig = field(default_factory=_sprompt)
    coda: CodaConfig = field(default_factory=CodaConfig)
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    ncm: NCMConfig = field(default_factory=NCMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: str = "none"  # none | bf16 | auto (bf16 where the device has native bf16, else none; build_run resolves it)
    compile: bool = False  # regional torch.compile of the backbone blocks, prefix attention eager (nn/regional_compile.py)
    cache_frozen_features: bool = True
    cache_prompted_features: bool = True  # memoise prompted test features per (image, slot) across evaluations
    cache_features_on_disk: bool = False  # keep them in the run directory too (a resume needs no recompute)
    output_dir: str = "runs"
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
