"""HiDe-Prompt and NoRGa (HiDe-Prompt with a non-linear residual gate): two registered methods, one pipeline.

Per task t, in the official order of both of its stages (NORGA_SPEC §2.1-2.2), fused into one run:
task-identity model training -> its class Gaussians -> its task-adaptive training (t > 0); then prompt
training on slot t (copied from t-1, momentum blend, CE + contrastive) -> momentum commit -> prompted
class Gaussians -> evaluation before TAP (t > 0) -> task-adaptive training of the head (t > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from norga.config import OptimConfig
from norga.methods.base import (
    SLOT_MODES,
    Capabilities,
    ContinualMethod,
    ImageIds,
    Phase,
    Prediction,
    PredictRequest,
    unfitting_blocks,
)
from norga.methods.hide.gaussians import ClassGaussians, official_tap_batches
from norga.methods.hide.official_checkpoints import (
    OfficialCheckpointError,
    official_task_checkpoints,
    official_tasks,
)
from norga.methods.hide.official_tii import load_official_task
from norga.methods.hide.prompted_memo import PromptedFeatureMemo
from norga.methods.hide.settings import HiDeSettings, NoRGaSettings, TAPConfig
from norga.methods.hide.task_identity import TaskIdentityModel
from norga.methods.registry import register_method
from norga.nn import TaskPrompts
from norga.nn.gates import NoRGaGate
from norga.nn.prompt_keys import majority_vote
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.features import FeatureSet
from norga.runtime.optim import cosine_annealing_factor, schedule_factor, set_epoch_lr
from norga.runtime.seeding import generator
from norga.runtime.training import PhaseTraining, masked_logits
from norga.storage import CheckpointError


def official_class_order(labels: Tensor, label: int, rng: torch.Generator) -> Tensor:
    """The rows of class `label` in `labels`, shuffled by `rng`: the official per-class statistics loader (a
    RandomSampler over the class's training images, test transform)."""
    rows = torch.nonzero(labels == label).flatten()
    return rows[torch.randperm(len(rows), generator=rng)]


def contrastive_loss(features: Tensor, prototypes: Tensor | None, temperature: float) -> Tensor:
    """HiDe-Prompt's regulariser: rows of [prototypes; features] must be most similar to themselves."""
    rows = features if prototypes is None else torch.cat([prototypes.to(features), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))


@register_method
class HiDePrompt(PhaseTraining, ContinualMethod):
    """HiDe-Prompt: per-task prefix slots (plain prefix tuning), task-identity inference, task-adaptive heads."""

    name = "hide"
    Settings = HiDeSettings
    extra_matrices = ("before_tap",)
    gate_kind = "none"  # the score gate on every prompted block: none, plain prefix tuning

    def __init__(self, context: RunContext, settings: HiDeSettings) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.prompts: TaskPrompts | None = None  # prompt.length 0: the pipeline without prompts
        if settings.prompt.length > 0:
            layers, depth = settings.prompt.layers, self.model.depth
            if not layers or min(layers) < 0 or max(layers) >= depth:
                raise unfitting_blocks(f"{self.name}.prompt.layers", layers, depth)
            self.prompts = TaskPrompts(self.model, len(context.tasks), settings.prompt.length,
                                       settings.prompt.layers, gate=self._gate(), prefix_layout=settings.prefix_layout,
                                       generator=context.init_generator).to(context.device)
            self.prompts.freeze()
        self.tii = TaskIdentityModel(self.model.embed_dim, context.num_classes, settings.tii.mlp_hidden,
                                     fc_norm=self.model.has_fc_norm).to(context.device)  # official MoCo v3 variant
        self.tii_gaussians = ClassGaussians()
        self.prompt_gaussians = ClassGaussians()
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_optimizer: dict | None = None
        memoise = self.prompts is not None and settings.cache_prompted_features and settings.prefix_layout == "correct"
        self.prompted_memo = PromptedFeatureMemo(self._slot_version) if memoise else None

    def _gate(self) -> str:
        return self.gate_kind

    def _prefixes(self, slots: Tensor | int, batch_size: int, momentum: float = 0.0) -> dict | None:
        """The ``prefixes`` of a forward pass with `slots` (None without prompts: the frozen backbone's pass)."""
        return None if self.prompts is None else self.prompts.prefixes(slots, batch_size, momentum)

    def _gate_schedule(self) -> str:
        return "none"

    # ----------------------------------------------------------------- phases
    def phases(self, task: int) -> list[Phase]:
        s = self.settings
        later = task > 0
        phases = [Phase("tii_train", s.tii.train.epochs), Phase("tii_stats")]
        if later:
            phases.append(Phase("tii_tap", s.tii.tap.epochs))
        phases += [Phase("wtp_train", s.wtp.train.epochs), Phase("momentum"), Phase("prompt_stats")]
        if later:
            phases += [Phase("evaluate_before_tap", evaluate="before_tap"), Phase("tap", s.wtp.tap.epochs)]
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
        s = self.settings.tii

        def batches(epoch: int):
            return self.ctx.frozen_training_batches(task, epoch, s.train.batch_size, s.augment, "tii")

        self._fit_classifier(self.tii, batches, self.ctx.class_mask(task), s.train, start_epoch, on_epoch_end,
                             f"{self.name}.tii.train.lr")

    def _tii_stats(self, task: int) -> None:
        self._add_class_statistics(self.tii_gaussians, self.ctx.frozen_train_features(task), task)

    def _add_class_statistics(self, gaussians: ClassGaussians, encoded: FeatureSet, task: int) -> None:
        """One Gaussian per class of `task` from the rows of `encoded` (features, labels) with that label."""
        for label in self.ctx.classes(task):
            gaussians.add_class(label, encoded.features[encoded.labels == label])

    def _tii_tap(self, task: int, start_epoch: int, on_epoch_end) -> None:
        self.tii.train()
        self._tap(task, start_epoch, on_epoch_end, self.settings.tii.tap, self.tii_gaussians,
                  list(self.tii.parameters()), self.tii, "tii_tap", f"{self.name}.tii.tap.lr")

    # ---------------------------------------------------------- prompt training
    def _train_prompts(self, task: int, start_epoch: int, on_epoch_end) -> None:
        s, model = self.settings, self.model
        prompt_params = []
        if self.prompts is not None:
            if start_epoch == 0 and task > 0:
                self.prompts.pool.copy_slot(task - 1, task)
            prompt_params = self.prompts.train_slot(task, self._gate_schedule())
        head = model.head_parameters()
        groups = [{"params": prompt_params}] if prompt_params else []
        self._phase_optimizer([*groups, {"params": head, "lr_scale": s.wtp.head_lr_scale}], s.wtp.train, start_epoch)
        momentum = s.prompt.momentum if task > 0 else 0.0
        allowed = self.ctx.class_mask(task)
        prototypes = self.prompt_gaussians.means(self.ctx.classes_before(task)) if task > 0 else None
        params = [*prompt_params, *head]
        model.train()
        for epoch in range(start_epoch, s.wtp.train.epochs):
            set_epoch_lr(self.optimizer, schedule_factor(s.wtp.train.schedule, epoch, s.wtp.train.epochs, s.wtp.train.lr))
            total = 0.0
            for batch in self.ctx.train_loader(task, epoch, s.wtp.train.batch_size):
                with self.ctx.autocast():
                    out = model(batch.images, prefixes=self._prefixes(task, len(batch.images), momentum))
                    loss = self._prompt_loss(out.logits.float(), out.features.float(), batch, allowed, prototypes)
                total += self._step(loss, params, s.wtp.train)
            self._end_epoch(epoch, total, s.wtp.train, on_epoch_end, lr_key=f"{self.name}.wtp.train.lr")
        model.eval()
        if self.prompts is not None:
            self.prompts.freeze()

    def _prompt_loss(self, logits: Tensor, features: Tensor, batch: TrainBatch, allowed: Tensor,
                     prototypes: Tensor | None) -> Tensor:
        """Masked cross-entropy plus the contrastive regulariser over the whole batch's features."""
        s = self.settings.wtp
        ce = self.ctx.batch_mean(F.cross_entropy(masked_logits(logits, allowed), batch.labels, reduction="none"), batch)
        contrastive = contrastive_loss(self.ctx.gather_batch(features, batch), prototypes, s.contrastive_temperature)
        return ce + s.contrastive_weight * self.ctx.replicated_term(contrastive)

    def _commit_momentum(self, task: int) -> None:
        if self.prompts is not None and task > 0 and self.settings.prompt.momentum > 0:
            self.prompts.pool.commit_blend(task, self.settings.prompt.momentum)

    def _prompt_stats(self, task: int) -> None:
        dataset = self.ctx.tasks[task].train_eval
        if self.prompts is None:  # without prompts the prompted features are the frozen ones, computed once
            self._add_class_statistics(self.prompt_gaussians, self.ctx.frozen_train_features(task), task)
            return
        if self.settings.class_stats_batches == "official":
            labels = self.ctx.frozen_train_features(task).labels
            for label in self.ctx.classes(task):
                order = official_class_order(labels, label, generator(self.ctx.config.seed, "prompt_stats", task,
                                                                      label))
                encoded = self.ctx.map_batches(Subset(dataset, order.tolist()), self.settings.wtp.train.batch_size,
                                               lambda images, _, rows: (self.encode(images, task),))[0]
                self.prompt_gaussians.add_class(label, encoded)
            return
        encoded = self.ctx.encode_dataset(dataset, lambda images: self.encode(images, task))
        self._add_class_statistics(self.prompt_gaussians, encoded, task)

    def _head_tap(self, task: int, start_epoch: int, on_epoch_end) -> None:
        """TAP of the prompted model's classifier: the head, and fc_norm where the backbone has one (official)."""
        self._tap(task, start_epoch, on_epoch_end, self.settings.wtp.tap, self.prompt_gaussians,
                  self.model.head_parameters(), self.model.classify, "tap", f"{self.name}.wtp.tap.lr")

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
            rng = generator(self.ctx.config.seed, key, task, epoch)
            total = 0.0
            chunks = official_tap_batches(gaussians, seen, previous if cfg.official_chunking else len(seen),
                                          cfg.samples_per_class, rng)
            for features, labels in chunks:  # the same samples in every process: no gradient exchange
                features, labels = features.to(self.ctx.device), labels.to(self.ctx.device)
                loss = F.cross_entropy(masked_logits(classifier(features), allowed), labels)
                total += self._step(loss, params, optim_cfg, sharded=False)
            self._end_epoch(epoch, total, optim_cfg, on_epoch_end, sharded=False, lr_key=lr_key)

    # --------------------------------------------------------------- inference
    def encode(self, images: Tensor, slots: Tensor | int) -> Tensor:
        """Prompted pre-logits of `images` with slot ``slots[b]`` for sample b (an int: one slot for all)."""
        with self.ctx.autocast():
            return self.model.forward_features(images, prefixes=self._prefixes(slots, len(images))).float()

    @torch.inference_mode()
    def predict_tasks(self, frozen_features: Tensor, seen_tasks: int) -> Tensor:
        """Task-identity inference from frozen features (masked to the seen classes)."""
        self.tii.eval()
        logits = masked_logits(self.tii(frozen_features.to(self.ctx.device)), self.ctx.class_mask_until(seen_tasks - 1))
        return self.ctx.class_to_task[logits.argmax(dim=1).cpu()]

    @property
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities, infers_tasks=True, slot_modes=SLOT_MODES, score_gate=True)

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """Frozen pass -> predicted task -> prompted pass with that task's slot -> class.

        With `image_ids` the prompted features are memoised per (image, slot) while the slot is unchanged
        (``cache_prompted_features``, correct prefix layout only): before- and after-TAP evaluations, later
        tasks' evaluations and the true-task (task-incremental) pass reuse them.
        """
        images, seen_tasks, frozen_features = request.images, request.seen_tasks, request.frozen_features
        slots, true_tasks = request.slots, request.true_tasks
        if frozen_features is None:
            frozen_features = self.ctx.frozen_encode(images)
        tasks = self.predict_tasks(frozen_features, seen_tasks) if slots == "predicted" else None
        chosen = {"predicted": tasks, "true": true_tasks, "none": None}[slots]
        if slots == "predicted" and self.settings.batchwise_prompt:  # official compat (P2): the batch's majority
            chosen = majority_vote(tasks[:, None], 1)[:, 0]  # ties: the lowest task id, as the official on CUDA
            if self.settings.task_identity_counts == "voted":
                tasks = chosen
        images = images.to(self.ctx.device)
        logits = self._logits(images, chosen, request.image_ids, frozen_features)
        within = None
        if true_tasks is not None:
            if chosen is not None and not torch.equal(chosen.cpu(), true_tasks.cpu()):
                logits_given_task = self._logits(images, true_tasks, request.image_ids, frozen_features)
            else:
                logits_given_task = logits
            within = self.within_task_classes(logits_given_task, true_tasks)
        return Prediction(self.seen_classes(logits, seen_tasks), tasks, within)

    def _logits(self, images: Tensor, slots: Tensor | None, image_ids: ImageIds | None,
                frozen_features: Tensor) -> Tensor:
        """Head logits of `images` prompted with slot ``slots[b]`` for sample b (None: no prompts, i.e. their
        `frozen_features`, which are already computed; so also without prompts)."""
        if slots is None or self.prompts is None:
            features = frozen_features
        else:
            slots = slots.cpu()

            def encode(mask: Tensor) -> Tensor:
                return self.encode(images[mask.to(images.device)], slots[mask].to(self.ctx.device))

            if self.prompted_memo is not None and image_ids is not None:
                features = self.prompted_memo.features(image_ids.dataset, image_ids.rows, slots, image_ids.size,
                                                       encode)
            else:
                features = encode(torch.ones(len(slots), dtype=torch.bool))
        return self.model.classify(features.to(self.ctx.device).float()).float()

    def _slot_version(self, slot: int) -> tuple[int, ...]:
        """In-place version counters of everything a slot's prompted features depend on (slot, gates; fc_norm is
        applied after the memo, by `PromptedViT.classify`)."""
        params = [self.prompts.pool.slots[slot], *self.prompts.gates.parameters()]
        return tuple((id(param), param._version) for param in params)

    # ------------------------------------------------- official checkpoints
    @classmethod
    def official_evaluation_overrides(cls) -> list[str]:
        """The official prompts were trained with the official prefix layout: evaluate them with it."""
        return [f"{cls.name}.prefix_layout=official"]

    def official_tasks(self, directory: Path) -> list[int]:
        return official_tasks(directory)

    def load_official(self, tii_dir: Path, prompt_dir: Path, task: int) -> dict[str, dict[str, Any]]:
        try:
            official_task_checkpoints(tii_dir, prompt_dir, task)
        except OfficialCheckpointError as error:
            raise CheckpointError(str(error)) from error
        try:
            reports = load_official_task(self.model, self.prompts, self.tii, tii_dir, prompt_dir, task)
        except OfficialCheckpointError as error:
            raise CheckpointError(f"{error} (set {self.name}.prompt.length, {self.name}.prompt.layers, "
                                  f"{self.name}.tii.mlp_hidden, data.num_tasks or backbone.* to the official run's)"
                                  ) from error
        return {stage: report.to_dict() for stage, report in reports.items()}

    # ------------------------------------------------------------ run record
    def data_parallel_refusal(self) -> str | None:
        if self.settings.prefix_layout == "official":
            return (f"{self.name}.prefix_layout=official mixes the samples of a training batch, which a distributed "
                    f"run splits across processes: run it in one process or use {self.name}.prefix_layout=correct")
        return None

    def compat(self) -> dict[str, Any]:
        s = self.settings
        return {"prefix_layout": s.prefix_layout, "batchwise_prompt": s.batchwise_prompt,
                "task_identity_counts": s.task_identity_counts, "class_stats_batches": s.class_stats_batches}

    def run_record(self) -> dict[str, Any]:
        return {"gate": self._gate()}

    @classmethod
    def summary(cls, settings: HiDeSettings) -> str:
        prompts = (f"Lp {settings.prompt.length} in blocks {settings.prompt.layers}" if settings.prompt.length
                   else "no prompts (Lp 0)")
        return (f"{prompts}, prompt epochs "
                f"{settings.wtp.train.epochs} (lr {settings.wtp.train.lr:g}), TII epochs {settings.tii.train.epochs}")

    # ------------------------------------------------------------------- state
    def owned_modules(self) -> dict[str, nn.Module]:
        """The prompts (nothing without prompts) and the task-identity model; the head is the host's."""
        return {"prompts": self.prompts if self.prompts is not None else nn.Module(), "tii": self.tii}

    def heavy_state_dict(self) -> dict[str, Any]:
        return {"tii_gaussians": self.tii_gaussians.state_dict(), "prompt_gaussians": self.prompt_gaussians.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.tii_gaussians.load_state_dict(state["tii_gaussians"])
            self.prompt_gaussians.load_state_dict(state["prompt_gaussians"])


@register_method
class NoRGa(HiDePrompt):
    """NoRGa: HiDe-Prompt with the non-linear residual gate ``s + α·σ(τ·s)`` on the prompt scores."""

    name = "norga"
    Settings = NoRGaSettings

    def _gate(self) -> str:
        return self.settings.gate

    def _gate_schedule(self) -> str:
        return self.settings.gate_train_tasks

    def compat(self) -> dict[str, Any]:
        return {**super().compat(), "gate_train_tasks": self.settings.gate_train_tasks}

    def run_record(self) -> dict[str, Any]:
        """The gate kind and the learned α, τ of each prompted block."""
        gates = [{"block": block, "alpha": float(gate.alpha), "tau": float(gate.tau)}
                 for block, gate in zip(self.prompts.layers, self.prompts.gates) if isinstance(gate, NoRGaGate)]
        return {**super().run_record(), "gates": gates}

    @classmethod
    def summary(cls, settings: NoRGaSettings) -> str:
        return f"gate {settings.gate} (trained: {settings.gate_train_tasks} task), " + super().summary(settings)
