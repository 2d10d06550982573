"""SMoPE (Le et al., ICLR 2026, "One-Prompt Strikes Back"): one pool of prefix experts shared by every task, each
sample routed per block and head to its top-K experts by the block's mean query; one prompted forward pass at test
time, no task identity.

Per task t (SMOPE_REPARAM_SPEC A8): for t > 0 the task boundary (key snapshot, usage flags); for t = 0 a dense
warm-up on every expert; top-K training with current-task cross-entropy, the router loss and (t > 0) the prototype
loss; a pass counting which experts the task's training images select; each new class's mean and per-dimension
variance under evaluation routing; for t > 0 classifier alignment of the head on draws from every seen class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.methods.base import ContinualMethod, Phase, Prediction, PredictRequest, check_blocks
from norga.methods.hide.gaussians import ClassGaussians
from norga.methods.hide.task_adaptive import TaskAdaptiveTraining
from norga.methods.registry import register_method
from norga.methods.smope.experts import ExpertPool, Routed, prototype_loss, router_loss
from norga.methods.smope.settings import SMoPEOptim, SMoPESettings
from norga.runtime.context import RunContext, SeededAugmentation, TrainBatch
from norga.runtime.optim import cosine_iteration_lr
from norga.runtime.seeding import derive_seed
from norga.runtime.training import PhaseTraining, masked_logits


@register_method
class SMoPE(PhaseTraining, ContinualMethod):
    """SMoPE: a sparse mixture of prefix experts shared by all tasks, routed by the mean query, usage-aware."""

    name = "smope"
    Settings = SMoPESettings

    def __init__(self, context: RunContext, settings: SMoPESettings) -> None:
        super().__init__(context, settings)
        self.model = model = context.model
        check_blocks(f"{self.name}.layers", settings.layers, model.depth)
        model.install_prefix_layers(settings.layers)
        self.pool = ExpertPool(settings.layers, model.num_heads, settings.num_experts, model.head_dim,
                               settings.top_k, generator=context.init_generator).to(context.device)
        self.gaussians = ClassGaussians(diagonal=True)
        self.alignment = TaskAdaptiveTraining(self.gaussians, settings.alignment, "smope_alignment",
                                              iteration_lr=self._alignment_lr)

    # ----------------------------------------------------------------- phases
    def phases(self, task: int) -> list[Phase]:
        s = self.settings
        phases = [Phase("boundary")] if task > 0 else []
        if task == 0 and s.warmup.epochs > 0:
            phases.append(Phase("dense_warmup", s.warmup.epochs))
        phases += [Phase("train", s.train.epochs), Phase("usage"), Phase("class_stats")]
        if task > 0:
            phases.append(Phase("alignment", s.alignment.epochs))
        return phases

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        s = self.settings
        if phase.name == "boundary":  # re-run exactly on resume: the checkpoint before it holds the state it reads
            self.pool.cross_boundary(s.usage_threshold)
        elif phase.name == "dense_warmup":
            self._train(task, s.warmup, True, 0, start_epoch, on_epoch_end)
        elif phase.name == "train":
            offset = s.warmup.epochs if task == 0 else 0  # fresh shuffles after the warm-up's
            self._train(task, s.train, False, offset, start_epoch, on_epoch_end)
        elif phase.name == "usage":
            self._count_usage(task)
        elif phase.name == "class_stats":
            self._class_stats(task)
        elif phase.name == "alignment":
            self.alignment.run(self, task, self.model.classify, self.model.head_parameters(), start_epoch,
                               on_epoch_end)
        else:
            raise ValueError(f"smope has no phase {phase.name!r}")

    # --------------------------------------------------------------- training
    def _train(self, task: int, cfg: SMoPEOptim, dense: bool, epoch_offset: int, start_epoch: int,
               on_epoch_end: Callable[[int, dict], None]) -> None:
        """Dense (every expert, cross-entropy only) or top-K (cross-entropy, router and prototype losses) training
        of the experts and the head on `task`'s classes, earlier classes masked."""
        s, ctx, model, pool = self.settings, self.ctx, self.model, self.pool
        groups = [{"params": [pool.keys, pool.values], "lr_scale": s.prompt_lr_scale},
                  {"params": model.head_parameters()}]

        def batches(epoch: int):
            return ctx.train_loader(task, epoch + epoch_offset, cfg.batch_size)

        self.train_phase(cfg, groups, batches, self.training_loss(task, dense), start_epoch, on_epoch_end,
                         train=[model], step_lr=self._training_lr(task, cfg))

    def training_loss(self, task: int, dense: bool) -> Callable[[TrainBatch], Tensor]:
        """The loss of a training batch of `task`: cross-entropy over the task's classes (earlier ones masked) and,
        with top-K routing (not `dense`), ``alpha_router`` x the router loss and (t > 0) ``alpha_proto`` x the
        prototype loss; the usage flags at the call decide the training penalty."""
        s, ctx, model, pool = self.settings, self.ctx, self.model, self.pool
        allowed = ctx.class_mask(task)
        penalties = None if dense else pool.training_penalties(s.noise)
        margin = s.noise if s.router_margin else 0.0
        alpha_router, alpha_proto = s.alpha_router, s.alpha_proto if task > 0 else 0.0

        def loss(batch: TrainBatch) -> Tensor:
            record: list[Routed] = []
            with ctx.autocast():
                logits = model(batch.images, attachments=pool.attachments(penalties, record)).logits.float()
            ce = F.cross_entropy(masked_logits(logits, allowed), batch.labels, reduction="none")
            total = ctx.batch_mean(ce, batch)
            if record and alpha_router > 0:
                routing = sum(router_loss(routed.scores, routed.selected, margin) for routed in record)
                total = total + alpha_router * ctx.batch_mean(routing, batch)
            if not dense and alpha_proto > 0:
                prototypes = prototype_loss(pool.old_keys, pool.keys, pool.frequent, s.top_k)
                total = total + ctx.replicated_term(alpha_proto * prototypes)
            return total

        return loss

    def _training_lr(self, task: int, cfg: SMoPEOptim) -> Callable[[int, int, float], float] | None:
        """coswm's lr per iteration (None: the per-epoch schedule `cfg.schedule`)."""
        first_at_base, official_iter_step = self.settings.official_first_step, self.settings.official_iter_step
        if cfg.schedule != "coswm":
            return None
        per_epoch = math.ceil(len(self.ctx.tasks[task].train) / cfg.batch_size)
        total, freeze = (official_iter_step or per_epoch) * cfg.epochs, cfg.freeze_iters

        def lr(epoch: int, step: int, base_lr: float) -> float:
            iteration = epoch * per_epoch + step
            if first_at_base and iteration == 0:  # official: the group's lr before the scheduler's first step
                return base_lr
            return cosine_iteration_lr(iteration, total, base_lr, freeze=freeze)

        return lr

    def _alignment_lr(self, iteration: int, total: int, base_lr: float) -> float:
        """Classifier alignment's cosine from alignment.lr to 1e-6 per iteration (official first step: 10 x lr)."""
        if self.settings.official_first_step and iteration == 0:
            return 10 * base_lr
        return cosine_iteration_lr(iteration, total, base_lr)

    # ------------------------------------------------- usage and class statistics
    def _augmented_train(self, task: int, stream: str) -> SeededAugmentation:
        """`task`'s training images with the training augmentation, seeded per (run seed, stream, task)."""
        return SeededAugmentation(self.ctx.tasks[task].train, derive_seed(self.ctx.config.seed, stream, task))

    @torch.no_grad()
    def _count_usage(self, task: int) -> None:
        """Add how often each expert is in a training image's top-K raw scores (evaluation routing)."""
        penalties = self.pool.evaluation_penalties(self.settings.unused_eval_penalty)

        def count(images: Tensor, labels: Tensor, rows: slice) -> tuple[Tensor]:
            record: list[Routed] = []
            with self.ctx.autocast():
                self.model.forward_features(images, attachments=self.pool.attachments(penalties, record))
            return (self.pool.usage_of(record)[None],)

        counts = self.ctx.map_batches(self._augmented_train(task, "smope_usage"), self.settings.train.batch_size,
                                      count)[0]
        self.pool.usage += counts.sum(dim=0).to(self.pool.usage.device)

    @torch.no_grad()
    def _class_stats(self, task: int) -> None:
        """Mean and per-dimension variance of each new class's features of augmented training views."""
        penalties = self.pool.evaluation_penalties(self.settings.unused_eval_penalty)

        def encode(images: Tensor, labels: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
            return self.encode(images, penalties), labels

        features, labels = self.ctx.map_batches(self._augmented_train(task, "smope_stats"),
                                                self.ctx.config.eval.batch_size, encode)
        self.gaussians.add_classes(features, labels.long(), self.ctx.classes(task))

    # --------------------------------------------------------------- inference
    def encode(self, images: Tensor, penalties: Tensor | None) -> Tensor:
        """Pre-logits of one prompted pass, routed with `penalties` (None: dense)."""
        with self.ctx.autocast():
            return self.model.forward_features(images, attachments=self.pool.attachments(penalties)).float()

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """One routed forward pass; never-used experts excluded (not with ``official_reload_evaluation``)."""
        s = self.settings
        unused = 0.0 if s.official_reload_evaluation else s.unused_eval_penalty
        features = self.encode(request.images.to(self.ctx.device), self.pool.evaluation_penalties(unused))
        logits = self.model.classify(features).float()
        within = None if request.true_tasks is None else self.within_task_classes(logits, request.true_tasks)
        return Prediction(self.seen_classes(logits, request.seen_tasks), within_task=within)

    # ------------------------------------------------------------------- state
    def owned_modules(self) -> dict[str, nn.Module]:
        """The expert pool with its routing state; the head is the host's."""
        return {"experts": self.pool}

    def heavy_state_dict(self) -> dict[str, Any]:
        return {"class_gaussians": self.gaussians.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.gaussians.load_state_dict(state["class_gaussians"])

    def compat(self) -> dict[str, Any]:
        s = self.settings
        return {"official_iter_step": s.official_iter_step, "official_first_step": s.official_first_step,
                "official_reload_evaluation": s.official_reload_evaluation}

    def run_record(self) -> dict[str, Any]:
        """Per prompted block, how many (head, expert) pairs were ever selected and how many are flagged frequent."""
        return {"smope": self.pool.routing_summary()}

    @classmethod
    def summary(cls, settings: SMoPESettings) -> str:
        return (f"{settings.num_experts} experts, top-{settings.top_k} per head in blocks {settings.layers}, "
                f"{settings.train.epochs} epochs (+{settings.warmup.epochs} dense on task 0)")
