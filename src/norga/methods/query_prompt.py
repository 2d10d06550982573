"""Methods whose prompts are a function of the frozen CLS feature (the query): L2P, DualPrompt, S-Prompt++, CODA.

One training phase per task (NORGA_SPEC §1.8): each augmented batch is encoded once by the frozen backbone
(the query, as the official code's extra frozen forward), the method builds its prompts from it, and the
loss is cross-entropy on logits masked to the task's classes (official ``train_mask``) plus the method's
own term (pull constraint, orthogonality). No task-identity model, no TAP. At test time the engine's
cached frozen features are the queries; the argmax runs over the seen classes (``eval.mask_final_logits``).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.methods.base import Capabilities, ContinualMethod, Phase, Prediction, PredictRequest, unfitting_blocks
from norga.nn.gates import ScoreGate, apply_gate_schedule, make_gate
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.training import PhaseTraining, masked_logits

log = logging.getLogger("norga")


class PromptedPass(NamedTuple):
    """What one prompted forward gives: logits, the method's extra loss terms and predicted tasks (or None).

    `sample_loss` (B,) is added to each sample's cross-entropy (e.g. minus the pull constraint);
    `penalty` is a term of the parameters alone (e.g. CODA's orthogonality penalty).
    """

    logits: Tensor
    sample_loss: Tensor | float = 0.0
    penalty: Tensor | float = 0.0
    tasks: Tensor | None = None


def fitting_layers(layers: Sequence[int], depth: int, key: str) -> list[int]:
    """The blocks of `layers` that exist in a `depth`-block backbone; the others are dropped with a warning."""
    kept = sorted({layer for layer in layers if 0 <= layer < depth})
    if len(kept) < len(set(layers)):
        log.warning("%s %s: this backbone has %d blocks, prompting blocks %s only", key, list(layers), depth, kept)
    return kept


class QueryPromptMethod(PhaseTraining, ContinualMethod):
    """Shared loop of the query-conditioned prompt methods; subclasses build prompts (`prompted`)."""

    def __init__(self, context: RunContext, settings: Any) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.num_heads, self.head_dim, self.embed_dim = self.model.num_heads, self.model.head_dim, self.model.embed_dim
        self.num_tasks = len(context.tasks)
        self.optimizer = None
        self._saved_optimizer = None

    def _layers(self, layers: Sequence[int], name: str) -> list[int]:
        kept = fitting_layers(layers, self.model.depth, f"{self.name}.{name}")
        if layers and not kept:
            raise unfitting_blocks(f"{self.name}.{name}", layers, self.model.depth)
        return kept

    def _gates(self, layers: Sequence[int]) -> nn.ModuleDict:
        """One score gate per prefix layer (identity unless the section's ``gate`` names a NoRGa activation)."""
        return nn.ModuleDict({str(layer): make_gate(self.settings.gate) for layer in layers})

    def _finish_init(self, prompts: nn.Module, prefix_layers: Sequence[int]) -> None:
        """Move the method's prompt modules to the device and give their blocks prefix attention."""
        self.prompts = prompts.to(self.ctx.device)
        self.model.install_prefix_layers(prefix_layers)

    # ------------------------------------------------------------- the method
    @abstractmethod
    def begin_task(self, task: int) -> None:
        """Prepare `task`'s prompts before its first epoch (sequential or orthogonal initialisation)."""

    def end_task(self, task: int) -> None:
        """Finish `task`'s prompts after its last epoch (e.g. fold reparameterized prefixes); must be idempotent,
        as a resumed run may repeat it. Nothing by default."""

    @abstractmethod
    def prompted(self, images: Tensor, query: Tensor, task: int, train: bool,
                 given_tasks: Tensor | None = None) -> PromptedPass:
        """Logits of `images` with prompts built from `query`; `task` is the one training, or the last seen.
        `given_tasks` (methods with task-keyed prompts only) gives each image its task's prompts instead."""

    @property
    def task_keyed(self) -> bool:
        """Whether each task has prompts of its own (then ``slots="true"`` means something)."""
        return False

    @property
    def capabilities(self) -> Capabilities:
        """Every prompt method can also run the frozen backbone through its head (``slots="none"``); task-keyed ones
        can give each image its true task's prompts (``"true"``)."""
        modes = ("predicted", "true", "none") if self.task_keyed else ("predicted", "none")
        return replace(super().capabilities, slot_modes=modes, score_gate=len(self.prompts["gates"]) > 0)

    def gate_of(self, layer: int) -> ScoreGate:
        return self.prompts["gates"][str(layer)]

    # ---------------------------------------------------------------- phases
    def phases(self, task: int) -> list[Phase]:
        return [Phase("prompt_train", self.settings.train.epochs)]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        cfg = self.settings.train
        if start_epoch == 0:
            self.begin_task(task)
        apply_gate_schedule(self.prompts["gates"].values(), self.settings.gate_train_tasks, task)
        params = [p for p in [*self.model.head_parameters(), *self.prompts.parameters()] if p.requires_grad]
        allowed = self.ctx.class_mask(task)

        def loss(batch: TrainBatch) -> Tensor:
            """Masked cross-entropy plus the method's per-sample term and its penalty on the parameters."""
            query = self._training_query(batch.images)
            with self.ctx.autocast():
                out = self.prompted(batch.images, query, task, train=True)
                ce = F.cross_entropy(masked_logits(out.logits.float(), allowed), batch.labels, reduction="none")
                return self.ctx.batch_mean(ce + out.sample_loss, batch) + self.ctx.replicated_term(out.penalty)

        self.train_phase(cfg, [{"params": params}], lambda epoch: self.ctx.train_loader(task, epoch, cfg.batch_size),
                         loss, start_epoch, on_epoch_end, train=[self.model])
        self.end_task(task)

    def _training_query(self, images: Tensor) -> Tensor:
        """The frozen CLS feature of an augmented batch, computed in eval mode (the official frozen model)."""
        self.model.eval()
        query = self.ctx.frozen_encode(images)
        self.model.train()
        return query

    # ------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """Query = frozen CLS feature (cached by the engine) -> prompts -> prompted pass -> class.

        Task-incremental (`true_tasks`): task-keyed methods run the batch again with each image's true task's
        prompts where any image chose another task's; the others restrict the same logits to the true task.
        """
        seen_tasks, slots, true_tasks = request.seen_tasks, request.slots, request.true_tasks
        images = request.images.to(self.ctx.device)
        query = (self.ctx.frozen_encode(images) if request.frozen_features is None
                 else request.frozen_features.to(self.ctx.device))
        given = true_tasks if slots == "true" else None
        out = self._pass(images, query, seen_tasks, slots, given)
        tasks = out.tasks.cpu() if out.tasks is not None and slots == "predicted" else None
        within = None
        if true_tasks is not None:
            logits = out.logits
            if self.task_keyed and slots == "predicted" and not torch.equal(out.tasks.cpu(), true_tasks.cpu()):
                logits = self._pass(images, query, seen_tasks, "true", true_tasks).logits
            within = self.within_task_classes(logits, true_tasks)
        return Prediction(self.seen_classes(out.logits, seen_tasks), tasks, within)

    def _pass(self, images: Tensor, query: Tensor, seen_tasks: int, slots: str,
              given_tasks: Tensor | None) -> PromptedPass:
        with self.ctx.autocast():
            if slots == "none":  # the frozen backbone's features are the query, already computed
                return PromptedPass(self.model.classify(query).float())
            out = self.prompted(images, query, seen_tasks - 1, train=False, given_tasks=given_tasks)
        return out._replace(logits=out.logits.float())

    # ------------------------------------------------------------------ state
    def owned_modules(self) -> dict[str, nn.Module]:
        return {"prompts": self.prompts}
