"""The analytic heads on frozen backbone features, registered as methods: ``simplecil`` (cosine nearest class
mean of raw features, Zhou et al. IJCV 2024) and ``ranpac`` (ridge regression on random ReLU features, McDonnell
et al. NeurIPS 2023). Neither trains by gradient: each task is one pass over its cached frozen features. With
``first_session`` (RanPAC's Phase 1) the backbone is first adapted on task 0 and frozen, and the features are the
adapted backbone's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from norga.methods.base import ContinualMethod, Phase, Prediction, PredictRequest
from norga.methods.ncm import nearness
from norga.methods.ranpac.first_session import AdaptationSettings, FirstSession, FirstSessionKind
from norga.methods.ranpac.ridge_head import RidgeHead, RidgeSettings, ridge_summary
from norga.methods.registry import register_method
from norga.runtime.context import RunContext
from norga.runtime.features import FeatureSet
from norga.runtime.training import PhaseTraining, load_owned_state, masked_logits


@dataclass
class FirstSessionSettings:
    """RanPAC's first-session adaptation (Phase 1): none (the official "No Phase 1" rows), or the kind of module
    trained on task 0 with a cosine head, then frozen."""

    first_session: FirstSessionKind = "none"  # none: frozen features; adapter (AdaptFormer), ssf or vpt_deep on task 1
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)


class AnalyticHead(PhaseTraining, ContinualMethod):
    """A head computed in closed form from each task's features (`learn`, `scores`): the frozen backbone's, cached
    once per image, or with ``first_session`` those of the backbone adapted on task 0 (`FirstSession`)."""

    PHASE: str

    def __init__(self, context: RunContext, settings: FirstSessionSettings) -> None:
        super().__init__(context, settings)
        self.model = context.model
        self.first_session = (None if settings.first_session == "none"
                              else FirstSession(self, settings.adaptation, settings.first_session))

    def phases(self, task: int) -> list[Phase]:
        adapt = self.first_session.phases(task) if self.first_session is not None else []
        return [*adapt, Phase(self.PHASE)]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        if phase.name == FirstSession.PHASE:
            self.first_session.run(start_epoch, on_epoch_end)
        else:
            self.learn(task, self._task_samples(task))

    def learn(self, task: int, samples: FeatureSet) -> None:
        """Add the task's training samples (features under the test transform) to the head."""
        raise NotImplementedError

    def scores(self, features: Tensor) -> Tensor:
        """Scores of every class (seen or not) for `features`."""
        raise NotImplementedError

    def _task_samples(self, task: int) -> FeatureSet:
        """The task's training features (test transform); every class of the task must have some."""
        ctx, adapted = self.ctx, self.first_session
        samples = ctx.frozen_train_features(task) if adapted is None else adapted.train_features(task)
        missing = sorted(set(ctx.classes(task)) - set(samples.labels.unique().tolist()))
        if missing:
            raise ValueError(f"classes {missing} of task {task + 1} have no training images: the analytic heads need "
                             "at least one per class (check data.train_per_class)")
        return samples

    def _features(self, request: PredictRequest) -> Tensor:
        """The request's features on the CPU: the adapted backbone's, else its cached frozen ones (else computed)."""
        if self.first_session is not None:
            return self.first_session.features(request)
        features = request.frozen_features
        return (self.ctx.frozen_encode(request.images) if features is None else features).cpu()

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        """Argmax over the seen classes (whatever ``eval.mask_final_logits``: the official heads have only those
        rows), and within each image's true task's classes when given."""
        scores = self.scores(self._features(request))
        allowed = self.ctx.class_mask_until(request.seen_tasks - 1).cpu()
        true_tasks = request.true_tasks
        within = None if true_tasks is None else self.within_task_classes(scores, true_tasks)
        return Prediction(masked_logits(scores, allowed).argmax(dim=1), within_task=within)

    # ------------------------------------------------------------------- state
    def owned_modules(self) -> dict[str, nn.Module]:
        """The first-session module and its cosine head (nothing without first-session adaptation)."""
        return {} if self.first_session is None else {"first_session": self.first_session.modules}

    def head_state_dict(self) -> dict[str, Any]:
        return {}

    def load_head_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `head_state_dict` returned."""

    def state_dict(self) -> dict[str, Any]:
        """The head's light state and, with first-session adaptation, what it trains and its optimizer's state."""
        state = self.head_state_dict()
        if self.first_session is not None:
            state["adaptation"] = self._model_and_optimizer_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.first_session is not None) != ("adaptation" in state):
            raise ValueError(f"the checkpoint was written with{'out' if self.first_session else ''} first-session "
                             f"adaptation: resume with the run's own {self.name}.first_session")
        if self.first_session is not None:
            load_owned_state(self._owned_sections(), state["adaptation"], ("optimizer",))
            self._saved_optimizer = state["adaptation"]["optimizer"]
        self.load_head_state_dict(state)

    def run_record(self) -> dict[str, Any]:
        return {"first_session": self.settings.first_session}


# ------------------------------------------------------------------------------------------------ SimpleCIL
@dataclass
class SimpleCILSettings(FirstSessionSettings):
    """Settings of ``simplecil`` (section ``simplecil:``): the head has nothing to tune; with ``first_session`` it
    is RanPAC's "NCM with Phase 1" row."""


@register_method
class SimpleCIL(AnalyticHead):
    """SimpleCIL: cosine similarity to each class's mean raw frozen feature (prototype), no training."""

    name = "simplecil"
    Settings = SimpleCILSettings
    PHASE = "prototypes"

    def __init__(self, context: RunContext, settings: SimpleCILSettings) -> None:
        super().__init__(context, settings)
        dim = context.model.backbone.num_features
        self.sums = torch.zeros(context.num_classes, dim, dtype=torch.float64)  # Σ raw features per class
        self.counts = torch.zeros(context.num_classes, dtype=torch.long)

    def learn(self, task: int, samples: FeatureSet) -> None:
        self.sums.index_add_(0, samples.labels, samples.features.double())
        self.counts += torch.bincount(samples.labels, minlength=len(self.counts))

    def prototypes(self) -> Tensor:
        """The mean of each class's raw features (zero for classes not seen)."""
        return self.sums / self.counts.clamp_min(1)[:, None]

    def scores(self, features: Tensor) -> Tensor:
        return masked_logits(nearness(features.double(), self.prototypes(), "cosine"), self.counts > 0)

    def head_state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_head_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])

    @classmethod
    def summary(cls, settings: SimpleCILSettings) -> str:
        return "cosine to raw-mean prototypes" + _adapted(settings)


# --------------------------------------------------------------------------------------------------- RanPAC
@dataclass
class RanPACSettings(RidgeSettings, FirstSessionSettings):
    """Settings of ``ranpac`` (section ``ranpac:``): the ridge head's and the first-session adaptation's."""


@register_method
class RanPAC(AnalyticHead):
    """RanPAC: ridge regression on random ReLU projections of frozen features, exact over tasks."""

    name = "ranpac"
    Settings = RanPACSettings
    PHASE = "statistics"

    def __init__(self, context: RunContext, settings: RanPACSettings) -> None:
        super().__init__(context, settings)
        self.head = RidgeHead(context.model.backbone.num_features, context.num_classes, settings,
                              context.config.seed, "ranpac")

    def learn(self, task: int, samples: FeatureSet) -> None:
        self.head.add_task(task, samples, self.ctx.classes(task))

    def scores(self, features: Tensor) -> Tensor:
        return self.head.class_scores(features)

    def head_state_dict(self) -> dict[str, Any]:
        return self.head.state_dict()

    def load_head_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state)

    def heavy_state_dict(self) -> dict[str, Any]:
        """W as drawn, and G (packed upper triangle) and Q in their accumulation dtype."""
        heavy = self.head.heavy_state_dict()
        return {"ranpac_projection": heavy["projection"], "ranpac_statistics": heavy["statistics"]}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.head.load_heavy_state_dict({"projection": state["ranpac_projection"],
                                             "statistics": state["ranpac_statistics"]})

    def compat(self) -> dict[str, Any]:
        return {"scores": self.settings.scores, "official_float32": self.settings.official_float32}

    def run_record(self) -> dict[str, Any]:
        """The projection's seed and width, the statistics' dtype and, per task, λ and its errors (and the seconds
        each step took, for the tasks this process ran: they are not part of the state)."""
        return {**super().run_record(), "ranpac": self.head.record()}

    @classmethod
    def summary(cls, settings: RanPACSettings) -> str:
        return ridge_summary(settings) + _adapted(settings)


def _adapted(settings: FirstSessionSettings) -> str:
    kind = settings.first_session
    return "" if kind == "none" else f", first session: {kind} ({settings.adaptation.train.epochs} epochs)"
