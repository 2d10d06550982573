"""VPT-NSP² registered as ``vptnsp``: one set of VPT-deep prompts shared by all tasks, trained task after task with
Adam steps projected into the approximate null space of the previous tasks' attention features (Lu et al.,
NeurIPS 2024; spec `VPT_NSP_SPEC.md`).

Per task: ``train`` (CE / τ on the current task's classes with that task's own head, plus the L1 loss that keeps each
prompt's mean and std at the previous task's), then, unless it is the last task, ``null_space``: the task's statistics
(`collector`), added to the history, and every block's projectors rebuilt from them (`null_space`). Prompts reach
the image tokens only as keys and values made by the block's own ``norm1`` and ``qkv`` (`ProjectedPrefix`), exactly
the official forward. Inference is one prompted pass over the concatenated heads of the seen tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.methods.base import Capabilities, ContinualMethod, Phase, Prediction, PredictRequest, check_blocks
from norga.methods.nsp.collector import collect_statistics, key_weight, task_statistics
from norga.methods.nsp.null_space import layer_projectors
from norga.methods.nsp.settings import OFFICIAL_DROP_SHIFT, VPTNSPSettings
from norga.methods.nsp.statistics import TaskStatistics
from norga.methods.registry import register_method
from norga.nn.attachments import ProjectedPrefix
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.optim import multistep_factor
from norga.runtime.training import NEG_INF, CheckpointMismatch, PhaseTraining

HEAD_STD = 0.02  # timm's head init (truncated normal), the official task-1 head


def drop_epochs(fractions: list[float], epochs: int, official: bool) -> list[int]:
    """The 0-based epochs from which each lr drop applies: round(f·epochs), a tenth of the epochs earlier with
    `official` (e.g. 100 epochs: [50, 80] as the paper says, [40, 70] as the official code runs)."""
    shift = OFFICIAL_DROP_SHIFT if official else 0.0
    return [max(0, math.floor((fraction - shift) * epochs + 0.5)) for fraction in fractions]


def fresh_head(dim: int, classes: int, generator: torch.Generator, torch_default: bool = False) -> nn.Linear:
    """A task's head: timm's init (truncated normal σ 0.02, zero bias) or torch's default Linear init, seeded."""
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        if torch_default:
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=generator)
            head.bias.uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim), generator=generator)
        else:
            nn.init.trunc_normal_(head.weight, std=HEAD_STD, generator=generator)
            head.bias.zero_()
    return head


def prompt_statistics_loss(prompts: dict[str, Tensor], anchors: dict[str, Tensor]) -> Tensor | float:
    """Σ over prompts of the mean L1 distance of each token's mean and population std over the features to the
    anchor's (the official L_LN; the paper's Eq. 27 sums over tokens instead of averaging)."""
    loss: Tensor | float = 0.0
    for name, anchor in anchors.items():
        prompt = prompts[name]
        loss = loss + F.l1_loss(prompt.mean(-1), anchor.mean(-1)) + F.l1_loss(prompt.std(-1, unbiased=False),
                                                                              anchor.std(-1, unbiased=False))
    return loss


@register_method
class VPTNSP(PhaseTraining, ContinualMethod):
    """VPT-NSP²: VPT-deep prompts shared by all tasks, null-space projected Adam, one head per task."""

    name = "vptnsp"
    Settings = VPTNSPSettings

    def __init__(self, context: RunContext, settings: VPTNSPSettings) -> None:
        super().__init__(context, settings)
        self.model = model = context.model
        self.optimizer, self._saved_optimizer = None, None
        check_blocks(f"{self.name}.layers", settings.layers, model.depth)
        self.layers = sorted(settings.layers)
        model.install_prefix_layers(self.layers)
        for param in model.head_parameters():  # the method classifies with heads of its own, one per task
            param.requires_grad_(False)
        generator, dim = context.init_generator, model.embed_dim
        prompts = {}
        for layer in self.layers:
            prompt = torch.zeros(1, settings.prompt_length, dim)
            if settings.prompt_init == "uniform":
                prompt.uniform_(-1.0, 1.0, generator=generator)
            prompts[str(layer)] = nn.Parameter(prompt)
        self.prompts = nn.ParameterDict(prompts).to(context.device)
        official = settings.official_head_init
        self.heads = nn.ModuleList([fresh_head(dim, len(task.classes), generator, torch_default=official and t >= 2)
                                    for t, task in enumerate(context.tasks)]).to(context.device)
        self.class_ids = torch.tensor([c for t in range(len(context.tasks)) for c in context.classes(t)])
        self.local_index = torch.zeros(context.num_classes, dtype=torch.long)
        for t in range(len(context.tasks)):
            self.local_index[context.classes(t)] = torch.arange(len(context.classes(t)))
        self.statistics = TaskStatistics()  # of every task learned so far (the history)
        self.projectors: dict[str, tuple[Tensor | None, Tensor | None]] = {}  # (left B2, right B1) by prompt name
        self.anchors: dict[str, Tensor] = {}  # the prompts at the end of the previous task (L_LN)

    # ------------------------------------------------------------------ model
    def prompt_name(self, layer: int) -> str:
        return f"prompts.{layer}"

    def named_prompts(self) -> dict[str, nn.Parameter]:
        return {self.prompt_name(layer): self.prompts[str(layer)] for layer in self.layers}

    def features(self, images: Tensor) -> Tensor:
        """Pre-logits with every block's prompts attached as keys and values through the block's own weights."""
        attachments = {layer: ProjectedPrefix(self.prompts[str(layer)]) for layer in self.layers}
        return self.model.forward_features(images, attachments)

    @property
    def capabilities(self) -> Capabilities:
        """Shared prompts: no task identity; ``slots="none"`` runs the frozen backbone through the same heads."""
        return replace(super().capabilities, slot_modes=("predicted", "none"))

    # ----------------------------------------------------------------- phases
    def phases(self, task: int) -> list[Phase]:
        phases = [Phase("train", self.settings.train.epochs)]
        if task < len(self.ctx.tasks) - 1:  # the last task's statistics would protect nothing
            phases.append(Phase("null_space"))
        return phases

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        if phase.name == "train":
            self._train(task, start_epoch, on_epoch_end)
        elif phase.name == "null_space":
            self._null_space(task)
        else:
            raise ValueError(f"{self.name} has no phase {phase.name!r}")

    def lr_factor(self, epoch: int) -> float:
        cfg = self.settings.train
        return multistep_factor(epoch, drop_epochs(cfg.lr_drops, cfg.epochs, self.settings.official_lr_drops))

    def task_loss(self, task: int, batch: TrainBatch) -> Tensor:
        """This process's share of CE(logits / τ) over the task's own head and classes, plus λ·L_LN."""
        with self.ctx.autocast():
            logits = self.heads[task](self.features(batch.images)).float()
        targets = self.local_index.to(batch.labels.device)[batch.labels]
        ce = F.cross_entropy(logits / self.settings.temperature, targets, reduction="none")
        anchored = self.settings.ln_loss_weight * prompt_statistics_loss(self.named_prompts(), self.anchors)
        return self.ctx.batch_mean(ce, batch) + self.ctx.replicated_term(anchored)

    def _train(self, task: int, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        cfg = self.settings.train
        if start_epoch == 0:
            self._begin_task(task)
        named = {**self.named_prompts(),
                 **{f"heads.{task}.{key}": param for key, param in self.heads[task].named_parameters()}}
        groups = [{"params": list(named.values()), "param_names": list(named)}]
        self.train_phase(cfg, groups, lambda epoch: self.ctx.train_loader(task, epoch, cfg.batch_size),
                         lambda batch: self.task_loss(task, batch), start_epoch, on_epoch_end,
                         step_lr=lambda epoch, _step, base_lr: base_lr * self.lr_factor(epoch),
                         projections=self.projectors)

    def _begin_task(self, task: int) -> None:
        """The official head reuse: task 2 (index 1) starts from task 1's trained head when they have one size."""
        heads = self.heads
        if self.settings.official_head_init and task == 1 and heads[1].weight.shape == heads[0].weight.shape:
            with torch.no_grad():
                heads[1].load_state_dict(heads[0].state_dict())

    def _null_space(self, task: int) -> None:
        """Statistics of the task's training images (test transform) with its final prompts, added to the history;
        every block's projectors from the history; the prompts become the next task's L_LN anchor."""
        ns = self.settings.null_space
        prompts = {layer: self.prompts[str(layer)] for layer in self.layers}
        collected = collect_statistics(self.ctx, prompts, self.ctx.tasks[task].train_eval,
                                       self.settings.statistics_batch_size, ns.per_batch_mean)
        names = {layer: self.prompt_name(layer) for layer in self.layers}
        self.statistics = self.statistics.merged(task_statistics(collected, names), ns.accumulate)
        blocks = self.model.backbone.blocks
        self.projectors = {}
        for layer in self.layers:
            left, right = layer_projectors(self.statistics.layers[names[layer]], key_weight(blocks[layer]), ns)
            if left is not None or right is not None:
                self.projectors[names[layer]] = tuple(None if m is None else m.float().to(self.ctx.device)
                                                      for m in (left, right))
        self.anchors = {name: prompt.detach().clone() for name, prompt in self.named_prompts().items()}

    # ------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """One prompted pass (or the frozen features, ``slots="none"``) through the seen tasks' heads."""
        seen = request.seen_tasks
        images = request.images.to(self.ctx.device)
        with self.ctx.autocast():
            if request.slots == "none":
                features = (self.ctx.frozen_encode(images) if request.frozen_features is None
                            else request.frozen_features.to(self.ctx.device))
            else:
                features = self.features(images)
            local = torch.cat([self.heads[t](features) for t in range(seen)], dim=1).float()
        logits = torch.full((len(images), self.ctx.num_classes), NEG_INF, device=local.device)
        logits[:, self.class_ids[: local.shape[1]].to(local.device)] = local
        within = None if request.true_tasks is None else self.within_task_classes(logits, request.true_tasks)
        return Prediction(self.seen_classes(logits, seen), within_task=within)

    # ------------------------------------------------------------------ state
    def owned_modules(self) -> dict[str, nn.Module]:
        return {"prompts": self.prompts, "heads": self.heads}

    def heavy_state_dict(self) -> dict[str, Any]:
        """What changes only in the null_space phase: the statistics, the projectors (saved, not recomputed: an
        eigendecomposition need not repeat bit for bit elsewhere) and the L_LN anchors."""
        projectors = {f"{name}.{side}": matrix for name, pair in self.projectors.items()
                      for side, matrix in zip(("left", "right"), pair) if matrix is not None}
        return {"null_space_statistics": self.statistics.state_dict(), "null_space_projectors": projectors,
                "prompt_anchors": {name: anchor.clone() for name, anchor in self.anchors.items()}}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = self.ctx.device
        self.statistics = TaskStatistics.from_state_dict(state["null_space_statistics"])
        matrices = state["null_space_projectors"]
        names = sorted({key.rsplit(".", 1)[0] for key in matrices})
        self.projectors = {name: tuple(matrices[f"{name}.{side}"].to(device) if f"{name}.{side}" in matrices
                                       else None for side in ("left", "right")) for name in names}
        self.anchors = {name: anchor.to(device) for name, anchor in state["prompt_anchors"].items()}
        known = set(self.named_prompts())
        stray = (set(self.projectors) | set(self.anchors) | set(self.statistics.layers)) - known
        if stray:
            raise CheckpointMismatch(f"the checkpoint has null-space state for {', '.join(sorted(stray))}, which this "
                                     "method does not prompt: resume with the settings the run was started with")

    def compat(self) -> dict[str, Any]:
        s = self.settings
        return {"official_lr_drops": s.official_lr_drops, "official_head_init": s.official_head_init,
                "null_space.nullity": s.null_space.nullity,
                "null_space.normalize_projection": s.null_space.normalize_projection,
                "null_space.per_batch_mean": s.null_space.per_batch_mean}

    def run_record(self) -> dict[str, Any]:
        """Per prompted block, the number of null directions of B2 and B1 (read back from the trace of the
        blended matrix: η·R + (1 − η)·k, or η·√R + (1 − η)·k when Frobenius-normalised)."""
        ns = self.settings.null_space
        dims = {}
        for name, pair in sorted(self.projectors.items()):
            dims[name] = {}
            for side, matrix, eta in zip(("left", "right"), pair, (ns.eta_aggregation, ns.eta_affinity)):
                if matrix is not None and eta > 0:
                    spread = (float(matrix.double().trace()) - (1 - eta) * matrix.shape[0]) / eta
                    dims[name][side] = round(spread ** 2 if ns.normalize_projection else spread)
        return {"vptnsp": {"null_dims": dims}}

    @classmethod
    def summary(cls, settings: VPTNSPSettings) -> str:
        ns = settings.null_space
        projector = ("paper's exact projector" if (ns.nullity, ns.normalize_projection) == ("paper", False)
                     else f"{ns.nullity} cut{', Frobenius-normalised' if ns.normalize_projection else ''}")
        return (f"M {settings.prompt_length} in {len(settings.layers)} blocks, τ {settings.temperature:g}, "
                f"η {ns.eta_affinity:g}/{ns.eta_aggregation:g}, {projector}, {settings.train.epochs} epochs")
