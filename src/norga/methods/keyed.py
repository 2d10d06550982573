"""L2P, DualPrompt and S-Prompt++ as in the official repository (NORGA_SPEC §1.8): one method, three configs.

A pool of prompt slots with one key each; a sample's slots are the top-k keys by cosine similarity to its
frozen CLS feature (while training DualPrompt / S-Prompt++ use the current task's slots instead). E-prompts
are prefixes in per-head key/value space (`prompt_type: prefix`) or tokens prepended before the class token
(`tokens`, L2P); DualPrompt adds a G-prompt, a prefix shared by all tasks. Loss: masked cross-entropy minus
λ times the pull constraint. The batch-wise majority vote is the compat switch ``eval.batchwise_prompt``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from norga.engine.context import RunContext
from norga.methods.base import register_method
from norga.methods.query_prompt import PromptedPass, QueryPromptMethod
from norga.nn import Prefix, PrefixPool
from norga.nn.prompt_keys import PromptKeys
from norga.nn.token_pool import TokenPool


class KeyedPromptMethod(QueryPromptMethod):
    """Key–query prompt selection over a pool; the config section says which of the three methods it is."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        s = self.settings
        if context.dist.enabled and self.config.eval.batchwise_prompt and s.train_selection == "similarity":
            raise ValueError(f"{self.section}: the batch-wise prompt vote while training couples the whole batch and "
                             "is not split across processes: run it in one process or set eval.batchwise_prompt=false")
        self.top_k = s.top_k
        self.pool_size = s.pool_size or self.num_tasks * s.top_k
        self.prefix_tuning = s.prompt_type == "prefix"
        self.e_layers = self._layers(s.layers, "layers")
        self.g_layers = self._layers(s.g_layers, "g_layers") if s.g_length > 0 else []
        if self.prefix_tuning:
            e_pool = PrefixPool(len(self.e_layers), self.pool_size, s.length, self.num_heads, self.head_dim)
        else:
            e_pool = TokenPool(len(self.e_layers), self.pool_size, s.length, self.embed_dim)
        prefix_layers = sorted({*self.g_layers, *(self.e_layers if self.prefix_tuning else [])})
        prompts = nn.ModuleDict({"key": PromptKeys(self.pool_size, self.embed_dim), "e": e_pool,
                                 "gates": self._gates(prefix_layers)})
        if self.g_layers:
            prompts["g"] = PrefixPool(len(self.g_layers), 1, s.g_length, self.num_heads, self.head_dim)
        self._finish_init(prompts, prefix_layers)

    def task_slots(self, task: int) -> range | None:
        """The slots task `task` trains under the task mask (None when the pool has run out, as official)."""
        slots = range(task * self.top_k, (task + 1) * self.top_k)
        return slots if slots.stop <= self.pool_size else None

    def begin_task(self, task: int) -> None:
        """Sequential init (official ``shared_prompt_pool``): task t's slots start as task t-1's."""
        current, previous = self.task_slots(task), self.task_slots(task - 1) if task > 0 else None
        if self.settings.sequential_init and current is not None and previous is not None:
            for source, target in zip(previous, current):
                self.prompts["e"].copy_slot(source, target)

    def prompted(self, images: Tensor, query: Tensor, task: int, train: bool) -> PromptedPass:
        forced = None
        if train and self.settings.train_selection == "task" and (slots := self.task_slots(task)) is not None:
            forced = torch.tensor([list(slots)], device=query.device)
        selection = self.prompts["key"].select(query, self.top_k, forced, batchwise=self.config.eval.batchwise_prompt)
        prefixes: dict[int, Prefix] = {}
        tokens: dict[int, Tensor] = {}
        if self.prefix_tuning:
            gathered = self.prompts["e"].gather_top_k(selection.indices, self.config.prompt.prefix_layout)
            prefixes = {layer: Prefix(k, v, self.gate_of(layer)) for layer, (k, v) in zip(self.e_layers, gathered)}
        else:
            tokens = dict(zip(self.e_layers, self.prompts["e"].gather_top_k(selection.indices)))
        if self.g_layers:
            for layer, (k, v) in zip(self.g_layers, self.prompts["g"].gather(0)):
                prefixes[layer] = _joined(prefixes.get(layer), Prefix(k, v, self.gate_of(layer)))
        logits = self.model(images, prefixes=prefixes, prompt_tokens=tokens).logits
        tasks = selection.indices[:, 0] // self.top_k if self.settings.train_selection == "task" else None
        return PromptedPass(logits, -self.settings.pull_weight * selection.per_sample_pull, tasks=tasks)


def _joined(first: Prefix | None, second: Prefix) -> Prefix:
    """Two prefixes of one layer as one, `first` before `second` along the prefix length."""
    if first is None:
        return second
    batch = max(first.key.shape[0], second.key.shape[0])
    key = torch.cat([first.key.expand(batch, -1, -1, -1), second.key.expand(batch, -1, -1, -1)], dim=2)
    value = torch.cat([first.value.expand(batch, -1, -1, -1), second.value.expand(batch, -1, -1, -1)], dim=2)
    return Prefix(key, value, first.gate)


@register_method("l2p")
class L2P(KeyedPromptMethod):
    """L2P (Wang et al., CVPR 2022) as the official repository runs it: prompt tuning at block 0, pool 30, top-5."""

    name = "l2p"
    section = "l2p"


@register_method("dualprompt")
class DualPrompt(KeyedPromptMethod):
    """DualPrompt (Wang et al., ECCV 2022): G-prefix in blocks 0-1, task-keyed E-prefixes in blocks 2-4."""

    name = "dualprompt"
    section = "dualprompt"


@register_method("sprompt")
class SPromptPlusPlus(KeyedPromptMethod):
    """S-Prompt++ (the repository's ``sprompt_5e``): task-keyed E-prefixes in blocks 0-4, no G-prompt."""

    name = "sprompt"
    section = "sprompt"
