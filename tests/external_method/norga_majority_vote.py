"""A head-only method from another package: predicts the seen class (or, given the true task, that task's class) with
the most training images. It registers through the ``norga.methods`` entry point of its package's metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from norga.config import NonNegativeFloat
from norga.methods import ContinualMethod, Phase, Prediction, PredictRequest


@dataclass
class MajorityVoteSettings:
    smoothing: NonNegativeFloat = 0.0  # added to every class's count


class MajorityVote(ContinualMethod):
    """Counts each class's training images; predicts the most frequent class among those allowed."""

    name = "majority_vote"
    Settings = MajorityVoteSettings

    def __init__(self, context, settings: MajorityVoteSettings) -> None:
        super().__init__(context, settings)
        self.counts = torch.full((context.num_classes,), settings.smoothing)

    def phases(self, task: int) -> list[Phase]:
        return [Phase("count")]

    def run_phase(self, task, phase, start_epoch, on_epoch_end) -> None:
        for label in self.ctx.frozen_train_features(task).labels:
            self.counts[label] += 1

    def predict(self, request: PredictRequest) -> Prediction:
        seen = self.ctx.class_mask_until(request.seen_tasks - 1).cpu()
        best = int(torch.where(seen, self.counts, -1.0).argmax())
        counts = self.counts.expand(len(request.images), -1)
        within = None if request.true_tasks is None else self.within_task_classes(counts, request.true_tasks)
        return Prediction(torch.full((len(request.images),), best), within_task=within)

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])
