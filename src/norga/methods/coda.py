"""CODA-Prompt (Smith et al., CVPR 2023) on the shared engine: decomposed, attention-weighted prefix prompts.

Settings follow GT-RIPL/CODA-Prompt: 100 components of length 8 in blocks 0-4, Adam lr 0.001 with its
cosine schedule, batch 128, no gradient clipping; task t's components are Gram-Schmidt re-initialised
orthogonal to the earlier tasks' before it trains. Loss: cross-entropy on the current task's classes plus
``coda.ortho_weight`` times the orthogonality penalty of K, A and P (the scripts use 0.0).
"""

from __future__ import annotations

from torch import Tensor, nn

from norga.engine.context import RunContext
from norga.engine.seeding import generator
from norga.methods.base import register_method
from norga.methods.query_prompt import PromptedPass, QueryPromptMethod
from norga.nn import Prefix
from norga.nn.coda_pool import CodaPool


@register_method("coda")
class CodaPrompt(QueryPromptMethod):
    """CODA-Prompt; ``coda.gate`` adds a NoRGa gate to its prefixes."""

    name = "coda"
    section = "coda"

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        s = self.settings
        self.layers = self._layers(s.layers, "layers")
        pool = CodaPool(len(self.layers), s.pool_size, s.length, self.num_heads, self.head_dim, self.num_tasks,
                        key_dim=self.embed_dim)
        self._finish_init(nn.ModuleDict({"pool": pool, "gates": self._gates(self.layers)}), self.layers)

    def begin_task(self, task: int) -> None:
        self.prompts["pool"].init_task(task, generator(self.config.seed, "coda", task))

    def prompted(self, images: Tensor, query: Tensor, task: int, train: bool) -> PromptedPass:
        pool: CodaPool = self.prompts["pool"]
        prefixes = {layer: Prefix(k, v, self.gate_of(layer))
                    for layer, (k, v) in zip(self.layers, pool.prefixes(query, task, train))}
        logits = self.model(images, prefixes=prefixes).logits
        extra = self.settings.ortho_weight * pool.ortho_loss(task) if train and self.settings.ortho_weight > 0 else 0.0
        return PromptedPass(logits, penalty=extra)
