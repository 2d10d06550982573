"""HiDe-Prompt and NoRGa (HiDe-Prompt with a non-linear residual gate): one method, the gate is config.

Per task t, in the official order of both of its stages (NORGA_SPEC §2.1-2.2), fused into one run:
task-identity model training -> its class Gaussians -> its task-adaptive training (t > 0); then prompt
training on slot t (copied from t-1, momentum blend, CE + contrastive) -> momentum commit -> prompted
class Gaussians -> evaluation before TAP (t > 0) -> task-adaptive training of the head (t > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from norga.config import OptimConfig, RunConfig, TAPConfig
from norga.engine.context import RunContext, TrainBatch
from norga.engine.features import PromptedFeatureMemo
from norga.engine.optim import cosine_annealing_factor, schedule_factor, set_epoch_lr
from norga.engine.seeding import generator
from norga.gaussians import ClassGaussians, official_tap_batches
from norga.methods.base import EVALUATE_BEFORE_TAP, ContinualMethod, ImageIds, Phase, Prediction, register_method
from norga.methods.training import PhaseTraining, masked_logits
from norga.tii import TaskIdentityModel


def contrastive_loss(features: Tensor, prototypes: Tensor | None, temperature: float) -> Tensor:
    """HiDe-Prompt's regulariser: rows of [prototypes; features] must be most similar to themselves."""
    rows = features if prototypes is None else torch.cat([prototypes.to(features), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))


@register_method("norga")
@register_method("hide", implies={"prompt.gate": None})
class HiDePrompt(PhaseTraining, ContinualMethod):
    """HiDe-Prompt pipeline; ``config.prompt.gate`` None is HiDe-Prompt, an activation name is NoRGa."""

    name = "hide"

    def __init__(self, context: RunContext) -> None:
        self.ctx = context
        self.config: RunConfig = context.config
        self.model = context.model
        dim = self.model.backbone.num_features
        num_classes = context.num_classes
        self.tii = TaskIdentityModel(dim, num_classes, self.config.tii.mlp_hidden).to(context.device)
        self.tii_gaussians = ClassGaussians()
        self.prompt_gaussians = ClassGaussians()
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_optimizer: dict | None = None
        memoise = self.config.cache_prompted_features and self.config.prompt.prefix_layout == "correct"
        self.prompted_memo = PromptedFeatureMemo(self._slot_version) if memoise else None

    # ----------------------------------------------------------------- phases
    def phases(self, task: int) -> list[Phase]:
        cfg = self.config
        later = task > 0
        phases = [Phase("tii_train", cfg.tii.train.epochs), Phase("tii_stats")]
        if later:
            phases.append(Phase("tii_tap", cfg.tii.tap.epochs))
        phases += [Phase("wtp_train", cfg.wtp.train.epochs), Phase("momentum"), Phase("prompt_stats")]
        if later:
            phases += [Phase(EVALUATE_BEFORE_TAP), Phase("tap", cfg.wtp.tap.epochs)]
        return phases

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        trainers = {"tii_train": self._train_tii, "tii_tap": self._tii_tap, "wtp_train": self._train_prompts,
                    "tap": self._head_tap}
        steps = {"tii_stats": self._tii_stats, "momentum": self._commit_momentum, "prompt_stats": self._prompt_stats}
        if phase.name in trainers:
            trainers[phase.name](task, start_epoch, on_epoch_end)
        else:
            steps[phase.name](task)

    # ------------------------------------------------------ task identity model
    def _train_tii(self, task: int, start_epoch: int, on_epoch_end) -> None:
        cfg = self.config.tii.train
        self._fit_classifier(self.tii, lambda epoch: self.ctx.tii_training_batches(task, epoch, cfg.batch_size),
                             self.ctx.class_mask(task), cfg, start_epoch, on_epoch_end, "tii.train.lr")

    def _tii_stats(self, task: int) -> None:
        frozen = self.ctx.frozen_train_features(task)
        for label in self.ctx.classes(task):
            self.tii_gaussians.add_class(label, frozen.features[frozen.labels == label])

    def _tii_tap(self, task: int, start_epoch: int, on_epoch_end) -> None:
        self.tii.train()
        self._tap(task, start_epoch, on_epoch_end, self.config.tii.tap, self.tii_gaussians,
                  list(self.tii.parameters()), self.tii, "tii_tap", "tii.tap.lr")

    # ---------------------------------------------------------- prompt training
    def _train_prompts(self, task: int, start_epoch: int, on_epoch_end) -> None:
        cfg, model = self.config.wtp.train, self.model
        if start_epoch == 0 and task > 0:
            model.pool.copy_slot(task - 1, task)
        model.set_gate_schedule(self.config.prompt.gate_train_tasks, task)
        model.pool.set_trainable_slot(task)
        groups = model.parameter_groups()
        self._phase_optimizer(
            [{"params": groups["prompts"] + groups["gates"]},
             {"params": groups["head"], "lr_scale": self.config.wtp.head_lr_scale}], cfg, start_epoch)
        momentum = self.config.prompt.momentum if task > 0 else 0.0
        allowed = self.ctx.class_mask(task)
        prototypes = self.prompt_gaussians.means(self.ctx.classes_before(task)) if task > 0 else None
        params = [p for group in groups.values() for p in group]
        model.train()
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch_lr(self.optimizer, schedule_factor(cfg.schedule, epoch, cfg.epochs, cfg.lr))
            total = 0.0
            for batch in self.ctx.train_loader(task, epoch, cfg.batch_size):
                with self.ctx.autocast():
                    out = model(batch.images, task, momentum=momentum)
                    loss = self._prompt_loss(out.logits.float(), out.features.float(), batch, allowed, prototypes)
                total += self._step(loss, params, cfg)
            self._end_epoch(epoch, total, cfg, on_epoch_end, lr_key="wtp.train.lr")
        model.eval()

    def _prompt_loss(self, logits: Tensor, features: Tensor, batch: TrainBatch, allowed: Tensor,
                     prototypes: Tensor | None) -> Tensor:
        """Masked cross-entropy plus the contrastive regulariser over the whole batch's features."""
        ce = self.ctx.batch_mean(F.cross_entropy(masked_logits(logits, allowed), batch.labels, reduction="none"), batch)
        contrastive = contrastive_loss(self.ctx.gather_batch(features, batch), prototypes,
                                       self.config.wtp.contrastive_temperature)
        return ce + self.config.wtp.contrastive_weight * self.ctx.replicated_term(contrastive)

    def _commit_momentum(self, task: int) -> None:
        if task > 0 and self.config.prompt.momentum > 0:
            self.model.pool.commit_blend(task, self.config.prompt.momentum)

    def _prompt_stats(self, task: int) -> None:
        features, labels = self.ctx.prompted_train_features(task)
        for label in self.ctx.classes(task):
            self.prompt_gaussians.add_class(label, features[labels == label])

    def _head_tap(self, task: int, start_epoch: int, on_epoch_end) -> None:
        head = self.model.backbone.head
        self._tap(task, start_epoch, on_epoch_end, self.config.wtp.tap, self.prompt_gaussians,
                  list(head.parameters()), head, "tap", "wtp.tap.lr")

    # ------------------------------------------------------------------ shared
    def _tap(self, task, start_epoch, on_epoch_end, cfg: TAPConfig, gaussians, params, classifier, key,
             lr_key: str) -> None:
        """Task-adaptive prediction: retrain `classifier` on Gaussian samples of every seen class (`lr_key`: the
        dotted key of ``cfg.lr``)."""
        optim_cfg = OptimConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer="sgd", clip_grad=None)
        self._phase_optimizer([{"params": params}], optim_cfg, start_epoch)
        seen = self.ctx.classes_until(task)
        allowed = self.ctx.class_mask_until(task)
        previous = len(self.ctx.classes_before(task))
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch_lr(self.optimizer, cosine_annealing_factor(epoch, cfg.epochs))
            rng = generator(self.config.seed, key, task, epoch)
            total = 0.0
            chunks = official_tap_batches(gaussians, seen, previous if cfg.official_chunking else len(seen),
                                          cfg.samples_per_class, rng)
            for features, labels in chunks:  # the same samples in every process: no gradient exchange
                features, labels = features.to(self.ctx.device), labels.to(self.ctx.device)
                loss = F.cross_entropy(masked_logits(classifier(features), allowed), labels)
                total += self._step(loss, params, optim_cfg, sharded=False)
            self._end_epoch(epoch, total, optim_cfg, on_epoch_end, sharded=False, lr_key=lr_key)

    # --------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict_tasks(self, frozen_features: Tensor, seen_tasks: int) -> Tensor:
        """Task-identity inference from frozen features (masked to the seen classes)."""
        self.tii.eval()
        logits = masked_logits(self.tii(frozen_features.to(self.ctx.device)), self.ctx.class_mask_until(seen_tasks - 1))
        return self.ctx.class_to_task[logits.argmax(dim=1).cpu()]

    @torch.inference_mode()
    def predict(self, images: Tensor, seen_tasks: int, frozen_features: Tensor | None = None,
                image_ids: ImageIds | None = None) -> Prediction:
        """Frozen pass -> predicted task -> prompted pass with that task's slot -> class.

        With `image_ids` the prompted features are memoised per (image, slot) while the slot is unchanged
        (``cache_prompted_features``, correct prefix layout only): before- and after-TAP evaluations and later
        tasks' evaluations reuse them.
        """
        if frozen_features is None:
            frozen_features = self.ctx.frozen_encode(images)
        tasks = self.predict_tasks(frozen_features, seen_tasks)
        slots = tasks
        if self.config.eval.batchwise_prompt:  # official compat (P2): the batch's majority task for all
            slots = torch.full_like(tasks, int(torch.mode(tasks).values))
        images = images.to(self.ctx.device)

        def encode(mask: Tensor) -> Tensor:
            with self.ctx.autocast():
                return self.model.forward_features(images[mask.to(images.device)], slots[mask].to(self.ctx.device))

        if self.prompted_memo is not None and image_ids is not None:
            features = self.prompted_memo.features(image_ids.dataset, image_ids.rows, slots, image_ids.size, encode)
        else:
            features = encode(torch.ones(len(slots), dtype=torch.bool))
        logits = self.model.classify(features.to(self.ctx.device).float()).float()
        if self.config.eval.mask_final_logits:
            logits = masked_logits(logits, self.ctx.class_mask_until(seen_tasks - 1))
        return Prediction(logits.argmax(dim=1).cpu(), tasks)

    def _slot_version(self, slot: int) -> tuple[int, ...]:
        """In-place version counters of everything a slot's prompted features depend on (slot, gates, fc_norm)."""
        params = [self.model.pool.slots[slot], *self.model.gates.parameters(),
                  *self.model.backbone.fc_norm.parameters()]
        return tuple((id(param), param._version) for param in params)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**self._model_and_optimizer_state(), "tii": self.tii.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_trainable_model_state(state["model"])
        self.tii.load_state_dict(state["tii"])
        self._saved_optimizer = state["optimizer"]

    def heavy_state_dict(self) -> dict[str, Any]:
        return {"tii_gaussians": self.tii_gaussians.state_dict(), "prompt_gaussians": self.prompt_gaussians.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.tii_gaussians.load_state_dict(state["tii_gaussians"])
            self.prompt_gaussians.load_state_dict(state["prompt_gaussians"])
