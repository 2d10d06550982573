"""SD-LoRA (Wu et al., ICLR 2025; WuYichen-97/SD-Lora-CL): scalable decoupled LoRA, LORA_SPEC §3.

Per task a new rank-r delta (A, B) on the query and value rows of every block's ``attn.qkv``; the old tasks' deltas
are frozen directions, each normalised and scaled by a learned magnitude shared by every block (`SDLoRABank`). One
phase per task, ``train_lora``: the new (A, B), every magnitude so far and the task's head train with cross-entropy
over the task's classes (the official masked CE); one forward pass at test time, argmax over the seen classes.

Correct by default, each official deviation (LORA_SPEC §3.9) behind a compat switch:

- directions normalised by ‖B·A‖_F (the paper); ``official_norm_product``: by ‖B‖_F·‖A‖_F;
- magnitudes kept across tasks and checkpointed; at a task's end its own magnitude absorbs its term's norm
  (`SDLoRABank.finish_task`); ``official_magnitude_reset``: every magnitude back to ``init_magnitude`` at each
  task's start, as the official code re-creates its backbone;
- the configured optimizer (``train``); ``official_sgd``: SGD with momentum 0.9 and no weight decay whatever
  ``train`` says (its lr, epochs and schedule still apply), as the official code hard-codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from norga.config import OptimConfig, PositiveFloat, PositiveInt
from norga.methods.base import Phase
from norga.methods.lora.banks import SDLoRABank
from norga.methods.lora.common import LoRAMethod
from norga.methods.registry import register_method
from norga.runtime.context import RunContext
from norga.runtime.seeding import generator


@dataclass
class SDLoRASettings:
    """SD-LoRA's settings (section ``sdlora:``); defaults: the official ImageNet-R config (``sdlora_inr.json``)."""

    rank: PositiveInt = 10  # r of every task's delta on q and v (official: 10)
    init_magnitude: PositiveFloat = 0.8  # a new task's magnitude (official: every magnitude, at every task's start)
    train: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=20, lr=0.01, batch_size=128, optimizer="adam", weight_decay=2e-4, schedule="constant", clip_grad=None))
    official_norm_product: bool = False  # compat: old directions divided by ‖B‖·‖A‖ instead of ‖B·A‖
    official_magnitude_reset: bool = False  # compat: every magnitude reset to init_magnitude at each task's start
    official_sgd: bool = False  # compat: SGD (momentum 0.9, no weight decay) whatever train.optimizer says


@register_method
class SDLoRA(LoRAMethod):
    """SD-LoRA: frozen normalised old directions with learned magnitudes, a new LoRA per task, one pass."""

    name = "sdlora"
    Settings = SDLoRASettings

    def __init__(self, context: RunContext, settings: SDLoRASettings) -> None:
        model = context.model
        init = generator(context.config.seed, "sdlora")
        bank = SDLoRABank(len(context.tasks), model.depth, model.embed_dim, settings.rank, settings.init_magnitude,
                          init, norm_product=settings.official_norm_product)
        super().__init__(context, settings, bank, head_init="kaiming_linear", generator=init)

    def phases(self, task: int) -> list[Phase]:
        return [Phase("train_lora", self.settings.train.epochs)]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        s = self.settings
        if start_epoch == 0 and task > 0:
            if s.official_magnitude_reset:
                self.bank.reset_magnitudes(task, s.init_magnitude)
            else:
                self.bank.finish_task(task - 1)
        optimizer = None
        if s.official_sgd:
            optimizer = replace(s.train, optimizer="sgd", momentum=None, betas=None, eps=None, weight_decay=0.0)
        self.train_task(task, start_epoch, on_epoch_end, optimizer)

    def compat(self) -> dict[str, Any]:
        s = self.settings
        return {"official_norm_product": s.official_norm_product,
                "official_magnitude_reset": s.official_magnitude_reset, "official_sgd": s.official_sgd}

    def run_record(self) -> dict[str, Any]:
        """The magnitudes as the run ended (the official code never saves them)."""
        return {"sdlora": {"magnitudes": [round(float(m.detach()), 6) for m in self.bank.magnitudes]}}

    @classmethod
    def summary(cls, settings: SDLoRASettings) -> str:
        optimizer = "sgd (official)" if settings.official_sgd else settings.train.optimizer
        return (f"rank {settings.rank} on q, v; magnitudes from {settings.init_magnitude:g}"
                f"{' reset per task' if settings.official_magnitude_reset else ''}; {optimizer} lr "
                f"{settings.train.lr:g}, epochs {settings.train.epochs}")
