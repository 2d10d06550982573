"""HiDe-Prompt and NoRGa (HiDe-Prompt with a non-linear residual gate): two registered methods, one pipeline.

Per task t, in the official order of both of its stages (NORGA_SPEC §2.1-2.2), fused into one run: the
task-identity component's phases (`task_identity.TaskIdentity`: model training -> its class Gaussians -> its
task-adaptive training, t > 0); then prompt training on slot t (copied from t-1, momentum blend, CE + contrastive)
-> momentum commit -> prompted class Gaussians -> evaluation before TAP (t > 0) -> task-adaptive training of the
head on them (`task_adaptive.TaskAdaptiveTraining`, t > 0).
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

from norga.methods.base import (
    SLOT_MODES,
    Capabilities,
    ContinualMethod,
    ImageIds,
    Phase,
    Prediction,
    PredictRequest,
    check_blocks,
)
from norga.methods.hide.gaussians import ClassGaussians
from norga.methods.hide.official_checkpoints import (
    OfficialCheckpointError,
    official_task_checkpoints,
    official_tasks,
)
from norga.methods.hide.official_tii import load_official_task
from norga.methods.hide.prompted_memo import PromptedFeatureMemo
from norga.methods.hide.settings import HiDeSettings, NoRGaSettings
from norga.methods.hide.task_adaptive import TaskAdaptiveTraining
from norga.methods.hide.task_identity import TaskIdentity, TaskIdentityModel
from norga.methods.ranpac.ridge_head import ridge_summary
from norga.methods.registry import register_method
from norga.nn import TaskPrompts
from norga.nn.gates import NoRGaGate
from norga.nn.prompt_keys import majority_vote
from norga.runtime.context import RunContext, TrainBatch
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
            check_blocks(f"{self.name}.prompt.layers", settings.prompt.layers, self.model.depth)
            self.prompts = TaskPrompts(self.model, len(context.tasks), settings.prompt.length,
                                       settings.prompt.layers, gate=self._gate(), prefix_layout=settings.prefix_layout,
                                       generator=context.init_generator, param=settings.prompt.param
                                       ).to(context.device)
            self.prompts.freeze()
        self.task_identity = TaskIdentity(self, settings.tii)
        self.prompt_gaussians = ClassGaussians()
        self.head_adaptation = TaskAdaptiveTraining(self.prompt_gaussians, settings.wtp.tap, "tap")
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_optimizer: dict | None = None
        memoise = self.prompts is not None and settings.cache_prompted_features and settings.prefix_layout == "correct"
        self.prompted_memo = PromptedFeatureMemo(self._slot_version) if memoise else None

    @property
    def tii(self) -> TaskIdentityModel | None:
        """The task-identity component's model (checkpoint key ``tii``; None with the RanPAC head)."""
        return self.task_identity.model

    @property
    def tii_gaussians(self) -> ClassGaussians:
        """The task-identity component's class Gaussians of frozen features."""
        return self.task_identity.gaussians

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
        phases = self.task_identity.phases(task)
        phases += [Phase("wtp_train", s.wtp.train.epochs), Phase("momentum"), Phase("prompt_stats")]
        if task > 0:
            phases += [Phase("evaluate_before_tap", evaluate="before_tap"), Phase("tap", s.wtp.tap.epochs)]
        return phases

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        if phase.name in TaskIdentity.PHASES:
            self.task_identity.run_phase(task, phase, start_epoch, on_epoch_end)
        elif phase.name == "wtp_train":
            self._train_prompts(task, start_epoch, on_epoch_end)
        elif phase.name == "tap":  # TAP of the prompted model's classifier: the head, and fc_norm where it has one
            self.head_adaptation.run(self, task, self.model.classify, self.model.head_parameters(), start_epoch,
                                     on_epoch_end)
        else:
            {"momentum": self._commit_momentum, "prompt_stats": self._prompt_stats}[phase.name](task)

    # ---------------------------------------------------------- prompt training
    def _train_prompts(self, task: int, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        s, model = self.settings, self.model
        prompt_params = []
        if self.prompts is not None:
            if start_epoch == 0:  # slot t copies slot t-1 (mlp: the MLP goes on), or starts afresh
                sources = [task - 1] if task > 0 and s.prompt.sequential_init else None
                self.prompts.pool.begin_slots([task], sources, generator(self.ctx.config.seed, "prompt_init", task))
            prompt_params = self.prompts.train_slot(task, self._gate_schedule())
        groups = [{"params": prompt_params}] if prompt_params else []
        groups.append({"params": model.head_parameters(), "lr_scale": s.wtp.head_lr_scale})
        momentum = s.prompt.momentum if task > 0 else 0.0
        allowed = self.ctx.class_mask(task)
        prototypes = self.prompt_gaussians.means(self.ctx.classes_before(task)) if task > 0 else None

        def loss(batch: TrainBatch) -> Tensor:
            with self.ctx.autocast():
                out = model(batch.images, prefixes=self._prefixes(task, len(batch.images), momentum))
                return self._prompt_loss(out.logits.float(), out.features.float(), batch, allowed, prototypes)

        def batches(epoch: int):
            return self.ctx.train_loader(task, epoch, s.wtp.train.batch_size)

        self.train_phase(s.wtp.train, groups, batches, loss, start_epoch, on_epoch_end, train=[model])
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
        """Slot t becomes its momentum blend (mlp: the blend of its MLP's output, folded into a plain slot)."""
        if self.prompts is not None:
            self.prompts.pool.commit(task, self.settings.prompt.momentum if task > 0 else 0.0)

    def _prompt_stats(self, task: int) -> None:
        if self.prompts is not None and self.settings.class_stats_batches == "official":
            self._official_prompt_stats(task)
            return
        if self.prompts is None:  # without prompts the prompted features are the frozen ones, computed once
            encoded = self.ctx.frozen_train_features(task)
        else:
            encoded = self.ctx.encode_dataset(self.ctx.tasks[task].train_eval, lambda images: self.encode(images, task))
        self.prompt_gaussians.add_classes(encoded.features, encoded.labels, self.ctx.classes(task))

    def _official_prompt_stats(self, task: int) -> None:
        """Each class's statistics from its own images in shuffled batches of wtp.train.batch_size (official)."""
        dataset = self.ctx.tasks[task].train_eval
        labels = self.ctx.frozen_train_features(task).labels
        for label in self.ctx.classes(task):
            order = official_class_order(labels, label, generator(self.ctx.config.seed, "prompt_stats", task, label))
            encoded = self.ctx.map_batches(Subset(dataset, order.tolist()), self.settings.wtp.train.batch_size,
                                           lambda images, _, rows: (self.encode(images, task),))[0]
            self.prompt_gaussians.add_class(label, encoded)

    # --------------------------------------------------------------- inference
    def encode(self, images: Tensor, slots: Tensor | int) -> Tensor:
        """Prompted pre-logits of `images` with slot ``slots[b]`` for sample b (an int: one slot for all)."""
        with self.ctx.autocast():
            return self.model.forward_features(images, prefixes=self._prefixes(slots, len(images))).float()

    def predict_tasks(self, frozen_features: Tensor, seen_tasks: int) -> Tensor:
        """Task-identity inference from frozen features (masked to the seen classes)."""
        return self.task_identity.predict_tasks(frozen_features, seen_tasks)

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
        params = [*self.prompts.pool.slot_parameters(slot), *self.prompts.gates.parameters()]
        return tuple((id(param), param._version) for param in params)

    # ------------------------------------------------- official checkpoints
    @classmethod
    def official_evaluation_overrides(cls) -> list[str]:
        """The official prompts were trained with the official prefix layout: evaluate them with it."""
        return [f"{cls.name}.prefix_layout=official"]

    def official_tasks(self, directory: Path) -> list[int]:
        return official_tasks(directory)

    def load_official(self, tii_dir: Path, prompt_dir: Path, task: int) -> dict[str, dict[str, Any]]:
        if self.tii is None:
            raise CheckpointError(f"the official task-identity checkpoints are MLP heads: evaluate them with --set "
                                  f"{self.name}.tii.head=mlp")
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
        return {"gate": self._gate(), **self.task_identity.record()}

    @classmethod
    def summary(cls, settings: HiDeSettings) -> str:
        mlp = " (MLP-reparameterized)" if settings.prompt.param == "mlp" else ""
        prompts = (f"Lp {settings.prompt.length} in blocks {settings.prompt.layers}{mlp}" if settings.prompt.length
                   else "no prompts (Lp 0)")
        tii = (f"TII epochs {settings.tii.train.epochs}" if settings.tii.head == "mlp"
               else f"TII RanPAC head ({ridge_summary(settings.tii.ranpac)})")
        return f"{prompts}, prompt epochs {settings.wtp.train.epochs} (lr {settings.wtp.train.lr:g}), {tii}"

    # ------------------------------------------------------------------- state
    def owned_modules(self) -> dict[str, nn.Module]:
        """The prompts (nothing without prompts) and the task-identity model; the head is the host's."""
        return {"prompts": self.prompts if self.prompts is not None else nn.Module(),
                "tii": self.tii if self.tii is not None else nn.Module()}

    def heavy_state_dict(self) -> dict[str, Any]:
        return {**self.task_identity.heavy_state_dict(), "prompt_gaussians": self.prompt_gaussians.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.task_identity.load_heavy_state_dict(state)
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
