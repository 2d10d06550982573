"""Task-identity inference (TII) as a component a method owns: the model (frozen CLS features -> residual MLP ->
head over all classes), its per-class Gaussians and its task-adaptive stage, trained in the owner's phases; or
RanPAC's ridge head on the frozen features, solved once per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norga.methods.base import Phase
from norga.methods.hide.gaussians import ClassGaussians
from norga.methods.hide.settings import TIISettings
from norga.methods.hide.task_adaptive import TaskAdaptiveTraining
from norga.methods.ranpac.ridge_head import RidgeHead
from norga.runtime.training import PhaseTraining, masked_logits


class ResidualMLP(nn.Module):
    """``LayerNorm(x + MLP(x))`` with hidden widths ``dim·h`` for h in `hidden` (NORGA_SPEC §1.7).

    Layer 0 is Linear -> GELU -> Dropout; a middle layer at index ``len(hidden)//2`` is followed by
    Dropout + LayerNorm (no activation), other middle layers by GELU + Dropout; the last layer maps back
    to `dim` and is followed by Dropout. `final_norm=False` drops the outer LayerNorm (MoCo v3 uses the
    backbone's ``fc_norm`` instead).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (2,), dropout: float = 0.0, final_norm: bool = True) -> None:
        super().__init__()
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden width multipliers must be positive integers, got {list(hidden)}")
        widths = [dim * h for h in hidden]
        layers: list[nn.Module] = [nn.Linear(dim, widths[0]), nn.GELU(), nn.Dropout(dropout)]
        for index in range(1, len(widths)):
            layers.append(nn.Linear(widths[index - 1], widths[index]))
            if index == len(widths) // 2:
                layers += [nn.Dropout(dropout), nn.LayerNorm(widths[index])]
            else:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        layers += [nn.Linear(widths[-1], dim), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.mlp(x))


class TaskIdentityModel(nn.Module):
    """Maps frozen backbone features to logits over all classes; the predicted class gives the task.

    With `fc_norm` (a backbone with MoCo v3's fc_norm, officially) the mapping has no outer LayerNorm and the
    model's own ``fc_norm`` (a LayerNorm with eps 1e-6, the ViT's norm layer) sits before the head.
    """

    def __init__(self, dim: int, num_classes: int, hidden: Sequence[int] = (2,), fc_norm: bool = False) -> None:
        super().__init__()
        self.mapping = ResidualMLP(dim, hidden, final_norm=not fc_norm)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if fc_norm else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def embed(self, features: Tensor) -> Tensor:
        """The mapped feature the head sees."""
        return self.fc_norm(self.mapping(features))

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.embed(features))


class TaskIdentity:
    """HiDe-Prompt's first stage as a component: per task, `model` learns the task's classes from frozen features
    (``tii_train``), `gaussians` gets each class's frozen-feature statistics (``tii_stats``), and from the second task
    on the model is retrained on samples of every seen class (``tii_tap``); then it predicts each image's task.

    With ``head ranpac`` a `RidgeHead` on the frozen features replaces all three: one exact, order-invariant solve
    per task (``tii_ridge``), and each image's task is the seen task of highest summed class score.

    `owner` is the method that owns it: it runs these phases in its training loop and `settings` is a section of
    its settings (so a diverged phase names e.g. ``hide.tii.train.lr``).
    """

    PHASES = ("tii_train", "tii_stats", "tii_tap", "tii_ridge")

    def __init__(self, owner: PhaseTraining, settings: TIISettings) -> None:
        ctx = owner.ctx
        self.owner, self.settings = owner, settings
        self.model: TaskIdentityModel | None = None
        self.ridge: RidgeHead | None = None
        if settings.head == "ranpac":
            self.ridge = RidgeHead(ctx.model.embed_dim, ctx.num_classes, settings.ranpac, ctx.config.seed,
                                   "tii-ranpac")
            return
        self.model = TaskIdentityModel(ctx.model.embed_dim, ctx.num_classes, settings.mlp_hidden,
                                       fc_norm=ctx.model.has_fc_norm).to(ctx.device)  # official MoCo v3 variant
        self.gaussians = ClassGaussians()
        self.adaptation = TaskAdaptiveTraining(self.gaussians, settings.tap, "tii_tap")

    def phases(self, task: int) -> list[Phase]:
        if self.ridge is not None:
            return [Phase("tii_ridge")]
        phases = [Phase("tii_train", self.settings.train.epochs), Phase("tii_stats")]
        if task > 0:
            phases.append(Phase("tii_tap", self.settings.tap.epochs))
        return phases

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        """Run one of its `PHASES`."""
        ctx = self.owner.ctx
        if phase.name == "tii_ridge":
            self.ridge.add_task(task, ctx.frozen_train_features(task), ctx.classes(task))
        elif phase.name == "tii_train":
            s = self.settings

            def batches(epoch: int):
                return ctx.frozen_training_batches(task, epoch, s.train.batch_size, s.augment, "tii")

            self.owner.fit_classifier(self.model, batches, ctx.class_mask(task), s.train, start_epoch, on_epoch_end)
        elif phase.name == "tii_stats":
            encoded = ctx.frozen_train_features(task)
            self.gaussians.add_classes(encoded.features, encoded.labels, ctx.classes(task))
        elif phase.name == "tii_tap":
            self.adaptation.run(self.owner, task, self.model, list(self.model.parameters()), start_epoch, on_epoch_end,
                                train=[self.model])
        else:
            raise KeyError(f"{phase.name!r} is not a task-identity phase; its phases are {self.PHASES}")

    @torch.inference_mode()
    def predict_tasks(self, frozen_features: Tensor, seen_tasks: int) -> Tensor:
        """The task of each image from its frozen features: the task of the argmax over the seen classes (MLP head),
        or the seen task whose classes' scores sum highest (RanPAC head)."""
        ctx = self.owner.ctx
        if self.ridge is not None:
            return task_scores(self.ridge.class_scores(frozen_features), ctx.class_to_task, seen_tasks).argmax(dim=1)
        self.model.eval()
        logits = masked_logits(self.model(frozen_features.to(ctx.device)), ctx.class_mask_until(seen_tasks - 1))
        return ctx.class_to_task[logits.argmax(dim=1).cpu()]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The MLP's weights (nothing with the RanPAC head: all of its state is heavy)."""
        return {} if self.model is None else self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.model is not None:
            self.model.load_state_dict(state)

    def heavy_state_dict(self) -> dict[str, Any]:
        """The class Gaussians (MLP head) or everything of the RanPAC head (changed only between phases), under the
        key of the owner's heavy state they go in."""
        if self.ridge is not None:
            return {"tii_ridge": {**self.ridge.state_dict(), **self.ridge.heavy_state_dict()}}
        return {"tii_gaussians": self.gaussians.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if self.ridge is not None:
            self.ridge.load_state_dict(state["tii_ridge"])
            self.ridge.load_heavy_state_dict(state["tii_ridge"])
        else:
            self.gaussians.load_state_dict(state["tii_gaussians"])

    def record(self) -> dict[str, Any]:
        """The RanPAC head's projection and per-task λ (nothing for the MLP head)."""
        return {} if self.ridge is None else {"tii_ranpac": self.ridge.record()}


def task_scores(class_scores: Tensor, class_to_task: Tensor, seen_tasks: int) -> Tensor:
    """Per image, each seen task's score: the sum of its classes' scores (ridge regression is linear in its targets,
    so these are exactly the scores of the same ridge fit to one-hot task targets)."""
    tasks = class_to_task.to(class_scores.device)
    seen = (tasks >= 0) & (tasks < seen_tasks)
    summed = class_scores.new_zeros(len(class_scores), seen_tasks)
    return summed.index_add_(1, tasks[seen], class_scores[:, seen])
