"""L2P, DualPrompt and S-Prompt++ as in the official repository (NORGA_SPEC §1.8): one method class, three
registered methods with their own settings.

A pool of prompt slots with one key each; a sample's slots are the top-k keys by cosine similarity to its
frozen CLS feature (while training DualPrompt / S-Prompt++ use the current task's slots instead). E-prompts
are prefixes in per-head key/value space (`prompt_type: prefix`) or tokens prepended before the class token
(`tokens`, L2P); DualPrompt adds a G-prompt, a prefix shared by all tasks. Loss: masked cross-entropy minus
λ times the pull constraint. The batch-wise majority vote is the compat switch ``batchwise_prompt`` of each section.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from norga.config import ConfigError, Count, NonNegativeFloat, OptimConfig, PositiveInt
from norga.methods.base import Capabilities
from norga.methods.query_prompt import PromptedPass, QueryPromptMethod
from norga.methods.registry import register_method
from norga.nn import Prefix, PrefixPool
from norga.nn.gates import GateKind, GateTrainTasks
from norga.nn.prefix_reparam import PrefixParam
from norga.nn.prompt_keys import PromptKeys
from norga.nn.token_pool import TokenPool
from norga.runtime.context import RunContext
from norga.runtime.seeding import generator


@dataclass
class KeyedPromptSettings:
    """Key–query prompt selection on the frozen CLS feature (NORGA_SPEC §1.8). Layers beyond the backbone's
    depth are dropped with a warning. Defaults: the official DualPrompt-family configs."""

    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=20, lr=0.0025))
    pool_size: PositiveInt | None = None  # None: top_k slots per task
    top_k: PositiveInt = 1
    length: PositiveInt = 20  # per slot (prefix: key and value vectors each)
    layers: list[Count] = field(default_factory=lambda: [2, 3, 4])  # E-prompt blocks
    prompt_type: Literal["prefix", "tokens"] = "prefix"  # prefix tuning | prompt tuning (tokens before CLS)
    train_selection: Literal["task", "similarity"] = "task"  # task: the current task's slots | similarity (L2P)
    sequential_init: bool = True  # the official shared_prompt_pool: task t's slots start as task t-1's
    pull_weight: NonNegativeFloat = 1.0  # pull constraint λ
    g_length: Count = 0  # G-prompt (a prefix shared by all tasks) length; 0 = none
    g_layers: list[Count] = field(default_factory=list)
    gate: GateKind | None = None  # a score gate on every prefix layer (e.g. a NoRGa activation); None = plain prefix
    gate_train_tasks: GateTrainTasks = "first"
    prefix_layout: Literal["correct", "official"] = "correct"  # official: the reshape that mixes samples (top_k 1)
    batchwise_prompt: bool = False  # official majority vote of the prompts per batch (P2; L2P votes while training)
    #: raw: prefix slots train directly; mlp: each slot a task trains (and the G-prompt) is produced by its own
    #: embeddings and MLP (Linear(D, 48), Tanh, Linear(48, 2D)), folded into a plain slot at the task's end
    prompt_param: PrefixParam = "raw"

    def check(self, section: str) -> None:
        """The reparameterization produces prefixes that belong to a task (checked at config load)."""
        if self.prompt_param == "mlp" and (self.prompt_type != "prefix" or self.train_selection != "task"):
            raise ConfigError(f"{section}.prompt_param=mlp reparameterizes the prefix slots a task trains: it needs "
                              f"{section}.prompt_type=prefix and {section}.train_selection=task, or set "
                              f"{section}.prompt_param=raw")


@dataclass
class L2PSettings(KeyedPromptSettings):
    """L2P's settings (section ``l2p:``): prompt tuning at block 0, pool 30, top-5, no task mask."""

    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=10, lr=0.0025))
    pool_size: PositiveInt | None = 30
    top_k: PositiveInt = 5
    length: PositiveInt = 5
    layers: list[Count] = field(default_factory=lambda: [0])
    prompt_type: Literal["prefix", "tokens"] = "tokens"
    train_selection: Literal["task", "similarity"] = "similarity"
    sequential_init: bool = False
    pull_weight: NonNegativeFloat = 0.1


@dataclass
class DualPromptSettings(KeyedPromptSettings):
    """DualPrompt's settings (section ``dualprompt:``): G-prefix in blocks 0-1, task-keyed E-prefixes in 2-4."""

    g_length: Count = 5
    g_layers: list[Count] = field(default_factory=lambda: [0, 1])


@dataclass
class SPromptSettings(KeyedPromptSettings):
    """S-Prompt++'s settings (section ``sprompt:``): task-keyed E-prefixes in blocks 0-4, no G-prompt."""

    layers: list[Count] = field(default_factory=lambda: [0, 1, 2, 3, 4])


class KeyedPromptMethod(QueryPromptMethod):
    """Key–query prompt selection over a pool; each of the three methods is this with its own settings."""

    def __init__(self, context: RunContext, settings: KeyedPromptSettings) -> None:
        super().__init__(context, settings)
        s = settings
        self.top_k = s.top_k
        self.pool_size = s.pool_size or self.num_tasks * s.top_k
        self.prefix_tuning = s.prompt_type == "prefix"
        self.e_layers = self._layers(s.layers, "layers")
        self.g_layers = self._layers(s.g_layers, "g_layers") if s.g_length > 0 else []
        if s.prompt_param == "mlp" and self.task_slots(self.num_tasks - 1) is None:
            raise ConfigError(f"{self.name}.prompt_param=mlp needs slots of its own for every task: pool_size "
                              f"{self.pool_size} holds top_k={s.top_k} slots for {self.pool_size // s.top_k} of the "
                              f"{self.num_tasks} tasks; set {self.name}.pool_size={self.num_tasks * s.top_k} (or "
                              f"more), or {self.name}.prompt_param=raw")
        reparam = {"param": s.prompt_param, "patch_inputs": self.model.patch_inputs}
        if self.prefix_tuning:
            e_pool = PrefixPool(len(self.e_layers), self.pool_size, s.length, self.num_heads, self.head_dim,
                                trained_at_once=s.top_k, **reparam)
        else:
            e_pool = TokenPool(len(self.e_layers), self.pool_size, s.length, self.embed_dim)
        prefix_layers = sorted({*self.g_layers, *(self.e_layers if self.prefix_tuning else [])})
        prompts = nn.ModuleDict({"key": PromptKeys(self.pool_size, self.embed_dim), "e": e_pool,
                                 "gates": self._gates(prefix_layers)})
        if self.g_layers:
            prompts["g"] = PrefixPool(len(self.g_layers), 1, s.g_length, self.num_heads, self.head_dim, **reparam)
        self._finish_init(prompts, prefix_layers)

    def task_slots(self, task: int) -> range | None:
        """The slots task `task` trains under the task mask (None when the pool has run out, as official)."""
        slots = range(task * self.top_k, (task + 1) * self.top_k)
        return slots if slots.stop <= self.pool_size else None

    def begin_task(self, task: int) -> None:
        """Sequential init (official ``shared_prompt_pool``): task t's slots start as task t-1's (mlp: from the MLPs
        that produced them, else drawn afresh); the G-prompt goes on from where the last task left it."""
        current, previous = self.task_slots(task), self.task_slots(task - 1) if task > 0 else None
        if current is not None:
            sources = previous if self.settings.sequential_init and previous is not None else None
            self.prompts["e"].begin_slots(current, sources, generator(self.ctx.config.seed, "prompt_init", task))
        if self.g_layers:
            self.prompts["g"].begin_slots([0], [0] if task > 0 else None, generator(self.ctx.config.seed, "g_init"))

    def end_task(self, task: int) -> None:
        """Task `task`'s trained slots and the G-prompt folded into plain prefixes (mlp; nothing for raw slots)."""
        if self.prefix_tuning:
            for slot in self.task_slots(task) or ():
                self.prompts["e"].commit(slot)
        if self.g_layers:
            self.prompts["g"].commit(0)

    @property
    def task_keyed(self) -> bool:
        """DualPrompt's and S-Prompt++'s slots belong to tasks (when the pool holds every task's)."""
        return self.settings.train_selection == "task" and self.task_slots(self.num_tasks - 1) is not None

    def prompted(self, images: Tensor, query: Tensor, task: int, train: bool,
                 given_tasks: Tensor | None = None) -> PromptedPass:
        forced = None
        if given_tasks is not None:
            forced = torch.stack([torch.tensor(list(self.task_slots(int(t)))) for t in given_tasks]).to(query.device)
        elif train and self.settings.train_selection == "task" and (slots := self.task_slots(task)) is not None:
            forced = torch.tensor([list(slots)], device=query.device)
        selection = self.prompts["key"].select(query, self.top_k, forced, batchwise=self.settings.batchwise_prompt)
        prefixes: dict[int, Prefix] = {}
        tokens: dict[int, Tensor] = {}
        if self.prefix_tuning:
            gathered = self.prompts["e"].gather_top_k(selection.indices, self.settings.prefix_layout)
            prefixes = {layer: Prefix(k, v, self.gate_of(layer)) for layer, (k, v) in zip(self.e_layers, gathered)}
        else:
            tokens = dict(zip(self.e_layers, self.prompts["e"].gather_top_k(selection.indices)))
        if self.g_layers:
            for layer, (k, v) in zip(self.g_layers, self.prompts["g"].gather(0)):
                prefixes[layer] = _joined(prefixes.get(layer), Prefix(k, v, self.gate_of(layer)))
        logits = self.model(images, prefixes=prefixes, prompt_tokens=tokens).logits
        tasks = selection.indices[:, 0] // self.top_k if self.settings.train_selection == "task" else None
        return PromptedPass(logits, -self.settings.pull_weight * selection.per_sample_pull, tasks=tasks)

    @property
    def capabilities(self) -> Capabilities:
        """Task-keyed slots (DualPrompt, S-Prompt++) say which task a sample's prompt belongs to; L2P's do not."""
        return replace(super().capabilities, infers_tasks=self.settings.train_selection == "task")

    def data_parallel_refusal(self) -> str | None:
        s = self.settings
        if s.batchwise_prompt and s.train_selection == "similarity":
            return (f"{self.name}.batchwise_prompt: the batch-wise prompt vote while training couples the whole "
                    f"batch and is not split across processes: run it in one process or set "
                    f"{self.name}.batchwise_prompt=false")
        if s.prefix_layout == "official" and s.prompt_type == "prefix":
            return (f"{self.name}.prefix_layout=official mixes the samples of a training batch, which a distributed "
                    f"run splits across processes: run it in one process or use {self.name}.prefix_layout=correct")
        return None

    def compat(self) -> dict[str, Any]:
        record: dict[str, Any] = {"batchwise_prompt": self.settings.batchwise_prompt}
        if self.prefix_tuning:
            record["prefix_layout"] = self.settings.prefix_layout
        return record

    def run_record(self) -> dict[str, Any]:
        return {"gate": self.settings.gate or "none"} if self.capabilities.score_gate else {}

    @classmethod
    def summary(cls, settings: KeyedPromptSettings) -> str:
        g = f", G-prefix {settings.g_length} in {settings.g_layers}" if settings.g_length else ""
        gate = f", gate {settings.gate}" if settings.gate else ""
        return (f"{settings.prompt_type} Lp {settings.length} in blocks {settings.layers}, pool "
                f"{settings.pool_size or 'top_k x tasks'} top-{settings.top_k}{g}{gate}, epochs {settings.train.epochs} "
                f"(lr {settings.train.lr:g})")


def _joined(first: Prefix | None, second: Prefix) -> Prefix:
    """Two prefixes of one layer as one, `first` before `second` along the prefix length."""
    if first is None:
        return second
    batch = max(first.key.shape[0], second.key.shape[0])
    key = torch.cat([first.key.expand(batch, -1, -1, -1), second.key.expand(batch, -1, -1, -1)], dim=2)
    value = torch.cat([first.value.expand(batch, -1, -1, -1), second.value.expand(batch, -1, -1, -1)], dim=2)
    return Prefix(key, value, first.gate)


@register_method
class L2P(KeyedPromptMethod):
    """L2P (Wang et al., CVPR 2022) as the official repository runs it: prompt tuning at block 0, pool 30, top-5."""

    name = "l2p"
    Settings = L2PSettings


@register_method
class DualPrompt(KeyedPromptMethod):
    """DualPrompt (Wang et al., ECCV 2022): G-prefix in blocks 0-1, task-keyed E-prefixes in blocks 2-4."""

    name = "dualprompt"
    Settings = DualPromptSettings


@register_method
class SPromptPlusPlus(KeyedPromptMethod):
    """S-Prompt++ (the repository's ``sprompt_5e``): task-keyed E-prefixes in blocks 0-4, no G-prompt."""

    name = "sprompt"
    Settings = SPromptSettings
