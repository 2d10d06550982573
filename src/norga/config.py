"""Typed run configuration: the sections every run has, and the value types settings are declared with.

A run's config is the shared schema below (data, backbone, eval, seed, precision, output) plus one section
holding the method's own settings, named after the method (``norga:``, ``l2p:`` ...) and typed by the
method's ``Settings`` dataclass (`norga.methods`). Field types carry their checks: ``Literal`` choices and
`Range` bounds (`PositiveInt`, `PositiveFloat` ...), validated in one place (`norga.config_io`).

Learning rates are the *effective* ones (the official scripts' ``lr · batch/256`` already applied), so a
preset says exactly what runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal


class ConfigError(ValueError):
    """A config that cannot be used; the message says what is wrong and what would be right."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric setting (inclusive unless `exclusive_min`); floats must also be finite."""

    min: float | None = None
    max: float | None = None
    exclusive_min: bool = False

    def violation(self, value: float) -> str | None:
        """Why `value` is out of range, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
        if self.min is not None and (value <= self.min if self.exclusive_min else value < self.min):
            low = f"> {self.min:g}" if self.exclusive_min else f">= {self.min:g}"
            return f"{low}" + (f" and <= {self.max:g}" if self.max is not None else "")
        if self.max is not None and value > self.max:
            return f"<= {self.max:g}" + (f" and >= {self.min:g}" if self.min is not None else "")
        return None


@dataclass(frozen=True)
class OneOf:
    """Choices of a string setting known only at run time (e.g. registered gate kinds)."""

    options: Callable[[], list[str]]


Count = Annotated[int, Range(min=0)]
PositiveInt = Annotated[int, Range(min=1)]
PositiveFloat = Annotated[float, Range(min=0.0, exclusive_min=True)]
NonNegativeFloat = Annotated[float, Range(min=0.0)]
Fraction = Annotated[float, Range(min=0.0, max=1.0)]
Temperature = PositiveFloat


@dataclass
class DataConfig:
    """Which continual benchmark and how its data is read."""

    benchmark: str = "cifar100"
    root: str | None = None  # else $NORGA_DATA, else a download when allowed
    num_tasks: PositiveInt | None = None  # None: the benchmark's own number of tasks
    normalization: Literal["backbone", "official", "none"] = "backbone"  # NORGA_SPEC P7; none: [0, 1] pixels as fed
    class_order: Literal["random", "numpy", "pcg64", "none"] = "random"  # from the seed: Python's random.shuffle; numpy's permutation (PyCIL family); numpy's PCG64 shuffle (VPT-NSP² code); none: the dataset's order
    train_per_class: PositiveInt | None = None  # subsample the training set (quick runs)
    test_per_class: PositiveInt | None = None  # subsample the test set (quick runs; reported in the run record)
    workers: Count = 0
    download: bool = False
    fiveds_transform_carryover: bool = False  # official bug P6, compat only
    skip_unreadable: bool = False  # leave out undecodable image files (counted in environment.json) instead of failing
    memory_budget_mb: Count = 2048  # image-file datasets whose pixels fit are decoded once into memory; 0: on access
    split_manifest: str | None = None  # imagenet-r: a split manifest file (default: the shipped / generated one)
    joint: bool = False  # upper bound: train once on the union of all tasks, test on each task (engine/joint.py)


@dataclass
class BackboneConfig:
    """The pre-trained ViT: a registry name or any timm model name, and where its weights come from."""

    name: str = "sup21k"
    weights: str = "hub"  # hub | none | package | a local file path
    timm_kwargs: dict = field(default_factory=dict)


#: The optimizers' own knobs at their standard values (what a knob left at None means).
SGD_MOMENTUM, ADAM_BETAS, ADAM_EPS = 0.9, (0.9, 0.999), 1e-8


@dataclass
class OptimConfig:
    """One gradient-training phase (a building block of method settings): its optimizer with every knob, schedule,
    epochs and batch size. A knob of the other optimizer is refused at config load (`check`)."""

    epochs: Count = 20
    lr: PositiveFloat = 0.00025
    batch_size: PositiveInt = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # adamw: decoupled weight decay
    schedule: Literal["constant", "step", "cosine", "coda_cosine"] = "constant"  # step: x0.1 every 30 epochs
    clip_grad: PositiveFloat | None = 1.0
    weight_decay: NonNegativeFloat = 0.0
    momentum: Fraction | None = None  # sgd only; None: 0.9
    betas: list[Fraction] | None = None  # adam only, [β1, β2] below 1; None: [0.9, 0.999]
    eps: PositiveFloat | None = None  # adam only; None: 1e-8

    def check(self, section: str) -> None:
        """Refuse a knob the chosen optimizer does not have, and Adam betas that are not two numbers below 1."""
        foreign = {"adam": ("momentum",), "adamw": ("momentum",), "sgd": ("betas", "eps")}[self.optimizer]
        for knob in foreign:
            if getattr(self, knob) is not None:
                other = "adam" if self.optimizer == "sgd" else "sgd"
                raise ConfigError(f"{section}.{knob} is a knob of {other}, but {section}.optimizer is "
                                  f"{self.optimizer}: remove {section}.{knob} or set {section}.optimizer={other}")
        if self.betas is not None and (len(self.betas) != 2 or max(self.betas) >= 1.0):
            raise ConfigError(f"{section}.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")


@dataclass
class EvalConfig:
    """Evaluation, for every method."""

    batch_size: PositiveInt = 128
    mask_final_logits: bool = True  # argmax over seen classes; False = official, over all classes (P17)


def section_path(settings: Any, section: Any) -> str:
    """The dotted path of the object `section` (e.g. an `OptimConfig`) inside the settings dataclass tree
    `settings`, found by identity: ``"wtp.train"``. A setting's key is then ``f"{method}.{path}.{field}"``."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is section:
            return f.name
        if hasattr(value, "__dataclass_fields__"):
            try:
                return f"{f.name}.{section_path(value, section)}"
            except LookupError:
                continue
    raise LookupError(f"{type(section).__name__} is not a section of these {type(settings).__name__}")


#: The top-level keys every run has, besides `method` and the method's own section.
SHARED_KEYS = ("method", "seed", "data", "backbone", "eval", "device", "amp", "compile", "attention_impl",
               "cache_frozen_features", "cache_features_on_disk", "output_dir", "name")


@dataclass
class RunConfig:
    """Everything one run needs: the shared schema plus `settings`, the method's own section.

    `norga run` resolves a preset plus overrides into this (`norga.config_io.load_config`); in YAML `settings`
    is the section named after the method. The schema names no method: `norga.config_io.default_config(method)`
    fills `settings` with a registered method's defaults.
    """

    method: str = ""  # a registered method's name (a config that names none runs config_io.DEFAULT_METHOD)
    seed: Count = 42
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    settings: Any = None  # the method's Settings dataclass (YAML: the section named after `method`); required
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: bf16 where the device computes it natively, else fp32 (resolved per run: resolve_config); none: exact fp32
    amp: Literal["none", "bf16", "auto"] = "auto"
    compile: bool = False  # regional torch.compile of the backbone blocks, prefix attention eager (nn/regional_compile.py)
    attention_impl: Literal["fused", "reference"] = "fused"  # how prefix attention is computed (equal results)
    cache_frozen_features: bool = True
    cache_features_on_disk: bool = False  # keep them in the run directory too (a resume needs no recompute)
    output_dir: str = "runs"
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: shared keys, with the method's settings as the section named after the method."""
        result: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "settings":
                result[self.method] = asdict(self.settings)
            else:
                value = getattr(self, f.name)
                result[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return result
