"""Lower bound `ncm`: nearest class mean on frozen backbone features. No training; after each task the
means of its classes are added, and a test image takes the seen class whose mean is nearest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from norga.methods.base import ContinualMethod, Phase, Prediction, PredictRequest
from norga.methods.registry import register_method
from norga.runtime.context import RunContext
from norga.runtime.training import masked_logits

METRICS = ("cosine", "euclidean")


@dataclass
class NCMSettings:
    """Settings of the lower bound ``ncm`` (section ``ncm:``)."""

    metric: Literal["cosine", "euclidean"] = "cosine"  # cosine: means of L2-normalised features


def class_mean(features: Tensor, metric: str) -> Tensor:
    """A class's prototype: the mean of its L2-normalised features (cosine) or of the raw features (euclidean)."""
    if metric not in METRICS:
        raise ValueError(f"unknown NCM metric {metric!r}; choose one of {METRICS}")
    return (F.normalize(features, dim=1) if metric == "cosine" else features).mean(dim=0)


def nearness(features: Tensor, means: Tensor, metric: str) -> Tensor:
    """Scores (n, classes), higher = nearer: cosine similarity, or minus the squared euclidean distance."""
    if metric == "cosine":
        return F.normalize(features, dim=1) @ F.normalize(means, dim=1).T
    return -torch.cdist(features, means).square()


@register_method
class NearestClassMean(ContinualMethod):
    """Lower bound: nearest class mean of frozen features (only seen classes have means, so the final
    argmax is always over the seen classes)."""

    name = "ncm"
    Settings = NCMSettings

    def __init__(self, context: RunContext, settings: NCMSettings) -> None:
        super().__init__(context, settings)
        self.metric = settings.metric
        dim = context.model.backbone.num_features
        self.means = torch.zeros(context.num_classes, dim)
        self.known = torch.zeros(context.num_classes, dtype=torch.bool)

    def phases(self, task: int) -> list[Phase]:
        return [Phase("class_means")]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        frozen = self.ctx.frozen_train_features(task)
        for label in self.ctx.classes(task):
            members = frozen.features[frozen.labels == label]
            if len(members) == 0:
                raise ValueError(f"class {label} of task {task + 1} has no training images: NCM needs at least one")
            self.means[label] = class_mean(members, self.metric)
            self.known[label] = True

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        frozen_features, seen_tasks, true_tasks = request.frozen_features, request.seen_tasks, request.true_tasks
        if frozen_features is None:
            frozen_features = self.ctx.frozen_encode(request.images)
        scores = masked_logits(nearness(frozen_features.float().cpu(), self.means, self.metric), self.known)
        allowed = self.ctx.class_mask_until(seen_tasks - 1).cpu()
        within = None if true_tasks is None else self.within_task_classes(scores, true_tasks)
        return Prediction(masked_logits(scores, allowed).argmax(dim=1), within_task=within)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.clone(), "known": self.known.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means.copy_(state["means"])
        self.known.copy_(state["known"])

    @classmethod
    def summary(cls, settings: NCMSettings) -> str:
        return f"metric {settings.metric}"
