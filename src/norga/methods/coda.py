"""CODA-Prompt (Smith et al., CVPR 2023) on the shared engine: decomposed, attention-weighted prefix prompts.

Settings follow GT-RIPL/CODA-Prompt: 100 components of length 8 in blocks 0-4, Adam lr 0.001 with its
cosine schedule, batch 128, no gradient clipping; task t's components are Gram-Schmidt re-initialised
orthogonal to the earlier tasks' before it trains. Loss: cross-entropy on the current task's classes plus
``coda.ortho_weight`` times the orthogonality penalty of K, A and P (the scripts use 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from norga.config import Count, NonNegativeFloat, OptimConfig, PositiveInt
from norga.methods.query_prompt import PromptedPass, QueryPromptMethod
from norga.methods.registry import register_method
from norga.nn import Prefix
from norga.nn.coda_pool import CodaPool
from norga.nn.gates import GateKind, GateTrainTasks
from norga.runtime.context import RunContext
from norga.runtime.seeding import generator


@dataclass
class CodaSettings:
    """CODA-Prompt's settings (section ``coda:``): M components per layer split evenly over the tasks,
    weighted by attention to the frozen CLS query. Adam lr 0.001, CODA's cosine schedule, no clipping."""

    train: OptimConfig = field(
        default_factory=lambda: OptimConfig(epochs=20, lr=0.001, schedule="coda_cosine", clip_grad=None))
    pool_size: PositiveInt = 100  # components per layer (M)
    length: PositiveInt = 8  # per component: first half key prefix, second half value prefix
    layers: list[Count] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    ortho_weight: NonNegativeFloat = 0.0  # orthogonality penalty μ (CODA's scripts: 0.0 with Gram-Schmidt re-init)
    gate: GateKind | None = None  # a score gate on every prefix layer (e.g. a NoRGa activation); None = none
    gate_train_tasks: GateTrainTasks = "first"


@register_method
class CodaPrompt(QueryPromptMethod):
    """CODA-Prompt; ``coda.gate`` adds a NoRGa gate to its prefixes."""

    name = "coda"
    Settings = CodaSettings

    def __init__(self, context: RunContext, settings: CodaSettings) -> None:
        super().__init__(context, settings)
        s = settings
        self.layers = self._layers(s.layers, "layers")
        pool = CodaPool(len(self.layers), s.pool_size, s.length, self.num_heads, self.head_dim, self.num_tasks,
                        key_dim=self.embed_dim)
        self._finish_init(nn.ModuleDict({"pool": pool, "gates": self._gates(self.layers)}), self.layers)

    def begin_task(self, task: int) -> None:
        self.prompts["pool"].init_task(task, generator(self.ctx.config.seed, "coda", task))

    def prompted(self, images: Tensor, query: Tensor, task: int, train: bool,
                 given_tasks: Tensor | None = None) -> PromptedPass:
        pool: CodaPool = self.prompts["pool"]
        prefixes = {layer: Prefix(k, v, self.gate_of(layer))
                    for layer, (k, v) in zip(self.layers, pool.prefixes(query, task, train))}
        logits = self.model(images, prefixes=prefixes).logits
        extra = self.settings.ortho_weight * pool.ortho_loss(task) if train and self.settings.ortho_weight > 0 else 0.0
        return PromptedPass(logits, penalty=extra)

    def run_record(self) -> dict:
        return {"gate": self.settings.gate or "none"}

    @classmethod
    def summary(cls, settings: CodaSettings) -> str:
        gate = f", gate {settings.gate}" if settings.gate else ""
        return (f"{settings.pool_size} components of length {settings.length} in blocks {settings.layers}{gate}, "
                f"ortho {settings.ortho_weight:g}, epochs {settings.train.epochs} (lr {settings.train.lr:g})")
