"""The analytic heads on frozen backbone features, registered as methods: ``simplecil`` (cosine nearest class
mean of raw features, Zhou et al. IJCV 2024) and ``ranpac`` (ridge regression on random ReLU features, McDonnell
et al. NeurIPS 2023). Neither trains by gradient: each task is one pass over its cached frozen features."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from norga.config import ConfigError, Count, PositiveFloat, Range
from norga.methods.base import ContinualMethod, Phase, Prediction, PredictRequest
from norga.methods.ncm import nearness
from norga.methods.ranpac.analytic import RandomFeatureMap, RidgeStatistics, one_hot, ridge_readout
from norga.methods.ranpac.ridge_selection import (
    LAMBDA_GRID,
    best_lambda,
    official_errors,
    resolvable_lambdas,
    split_rows,
    validation_errors,
)
from norga.methods.registry import register_method
from norga.runtime.context import RunContext
from norga.runtime.features import FeatureSet
from norga.runtime.seeding import derive_seed
from norga.runtime.training import masked_logits

log = logging.getLogger("norga")


def _frozen(method: ContinualMethod, request: PredictRequest) -> Tensor:
    """The request's cached frozen features, else the frozen backbone's, on the CPU."""
    features = request.frozen_features
    return (method.ctx.frozen_encode(request.images) if features is None else features).cpu()


def _prediction(method: ContinualMethod, scores: Tensor, request: PredictRequest) -> Prediction:
    """Argmax over the seen classes (whatever ``eval.mask_final_logits``: the official heads have only those
    rows), and within each image's true task's classes when given."""
    allowed = method.ctx.class_mask_until(request.seen_tasks - 1).cpu()
    true_tasks = request.true_tasks
    within = None if true_tasks is None else method.within_task_classes(scores, true_tasks)
    return Prediction(masked_logits(scores, allowed).argmax(dim=1), within_task=within)


def _task_samples(context: RunContext, task: int) -> FeatureSet:
    """The task's cached frozen training features (test transform); every class of the task must have some."""
    frozen = context.frozen_train_features(task)
    missing = sorted(set(context.classes(task)) - set(frozen.labels.unique().tolist()))
    if missing:
        raise ValueError(f"classes {missing} of task {task + 1} have no training images: the analytic heads need at "
                         "least one per class (check data.train_per_class)")
    return frozen


# ------------------------------------------------------------------------------------------------ SimpleCIL
@dataclass
class SimpleCILSettings:
    """Settings of ``simplecil`` (section ``simplecil:``): none, the method has nothing to tune."""


@register_method
class SimpleCIL(ContinualMethod):
    """SimpleCIL: cosine similarity to each class's mean raw frozen feature (prototype), no training."""

    name = "simplecil"
    Settings = SimpleCILSettings

    def __init__(self, context: RunContext, settings: SimpleCILSettings) -> None:
        super().__init__(context, settings)
        dim = context.model.backbone.num_features
        self.sums = torch.zeros(context.num_classes, dim, dtype=torch.float64)  # Σ raw features per class
        self.counts = torch.zeros(context.num_classes, dtype=torch.long)

    def phases(self, task: int) -> list[Phase]:
        return [Phase("prototypes")]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        frozen = _task_samples(self.ctx, task)
        self.sums.index_add_(0, frozen.labels, frozen.features.double())
        self.counts += torch.bincount(frozen.labels, minlength=len(self.counts))

    def prototypes(self) -> Tensor:
        """The mean of each class's raw features (zero for classes not seen)."""
        return self.sums / self.counts.clamp_min(1)[:, None]

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        features = _frozen(self, request).double()
        scores = masked_logits(nearness(features, self.prototypes(), "cosine"), self.counts > 0)
        return _prediction(self, scores, request)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])

    @classmethod
    def summary(cls, settings: SimpleCILSettings) -> str:
        return "cosine to raw-mean prototypes"


# --------------------------------------------------------------------------------------------------- RanPAC
@dataclass
class RanPACSettings:
    """Settings of ``ranpac`` (section ``ranpac:``)."""

    projection_dim: Count = 10000  # M; 0: no projection, ridge on the raw features (the official "No RPs" ablation)
    ridge_lambda: PositiveFloat | None = None  # None: λ chosen per task on `lambdas`; a value: that λ for every task
    lambdas: list[PositiveFloat] = field(default_factory=lambda: list(LAMBDA_GRID))  # the candidates, ascending
    lambda_fit_fraction: Annotated[float, Range(0.0, 1.0, exclusive_min=True)] = 0.8  # of a task's samples, seeded split: fit each λ; the rest validate
    scores: Literal["inner", "cosine"] = "inner"  # inner: official; cosine: LAMDA-PILOT's port (normalised rows)
    official_float32: bool = False  # compat: G, Q, the λ search (one LU solve per λ) and the solve in float32

    def check(self, section: str) -> None:
        if not self.lambdas:
            raise ConfigError(f"{section}.lambdas is empty: give at least one candidate, e.g. --set "
                              f"{section}.lambdas=[1e2,1e4], or fix λ with --set {section}.ridge_lambda=VALUE")
        if not self.lambda_fit_fraction < 1:
            raise ConfigError(f"{section}.lambda_fit_fraction must be < 1 (the rest of a task's samples validate), "
                              f"got {self.lambda_fit_fraction}: e.g. --set {section}.lambda_fit_fraction=0.8")


@register_method
class RanPAC(ContinualMethod):
    """RanPAC: ridge regression on random ReLU projections of frozen features, exact over tasks."""

    name = "ranpac"
    Settings = RanPACSettings

    def __init__(self, context: RunContext, settings: RanPACSettings) -> None:
        super().__init__(context, settings)
        self.dtype = torch.float32 if settings.official_float32 else torch.float64
        self.projection_seed = derive_seed(context.config.seed, "ranpac-projection")
        self.features = RandomFeatureMap(context.model.backbone.num_features, settings.projection_dim,
                                         self.projection_seed, self.dtype)
        self.statistics = RidgeStatistics(self.features.dim, context.num_classes, self.dtype)
        self.readout = torch.zeros(context.num_classes, self.features.dim, dtype=self.dtype)  # W_o (K×M)
        self.tasks: list[dict[str, Any]] = []  # per task: λ, its validation errors, the split seed
        self.seconds: dict[int, dict[str, float]] = {}  # per task run in this process: statistics, λ search, solve

    def phases(self, task: int) -> list[Phase]:
        return [Phase("statistics")]

    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        frozen = _task_samples(self.ctx, task)
        started = time.perf_counter()
        self.statistics.add(self.features, frozen.features, frozen.labels)
        accumulated = time.perf_counter()
        record = self._choose_lambda(task, frozen)
        chosen = time.perf_counter()
        solver = "lu" if self.settings.official_float32 else "cholesky"
        self.readout = ridge_readout(self.statistics.gram, self.statistics.targets, record["lambda"], solver)
        solved = time.perf_counter()
        self.seconds[task + 1] = {"statistics": round(accumulated - started, 3),
                                  "lambda_search": round(chosen - accumulated, 3), "solve": round(solved - chosen, 3)}
        self.tasks.append(record)
        log.info("ranpac task %d: λ %g (statistics %.2f s, λ search %.2f s, solve %.2f s)", task + 1, record["lambda"],
                 *self.seconds[task + 1].values())

    def _choose_lambda(self, task: int, frozen: FeatureSet) -> dict[str, Any]:
        """λ for this task: the fixed one, or the official rule on a split seeded from (seed, task), among the
        candidates the solve resolves in float64 (all of them with the official float32 numerics)."""
        s = self.settings
        if s.ridge_lambda is not None:
            return {"task": task + 1, "lambda": s.ridge_lambda}
        candidates = s.lambdas if s.official_float32 else resolvable_lambdas(s.lambdas, self.statistics.gram)
        if not candidates:
            candidates = [max(s.lambdas)]
            log.warning("ranpac task %d: every λ candidate is below float64's resolution of G (tr %.3g): using %g",
                        task + 1, float(self.statistics.gram.trace()), candidates[0])
        classes = self.ctx.classes(task)
        column = torch.full((self.ctx.num_classes,), -1, dtype=torch.long)
        column[classes] = torch.arange(len(classes))
        targets = one_hot(column[frozen.labels], len(classes), self.dtype)
        split_seed = derive_seed(self.ctx.config.seed, "ranpac-lambda", task)
        split = split_rows(len(frozen.labels), s.lambda_fit_fraction, torch.Generator().manual_seed(split_seed))
        errors_of = official_errors if s.official_float32 else validation_errors
        errors = errors_of(self.features, frozen.features, targets, split, candidates, self.ctx.num_classes)
        by_lambda = dict(zip(candidates, errors.tolist()))
        return {"task": task + 1, "lambda": best_lambda(errors, candidates), "split_seed": split_seed,
                "validation_mse": [by_lambda.get(ridge) for ridge in s.lambdas]}  # None: not resolvable

    def class_scores(self, features: Tensor) -> Tensor:
        """ReLU(xᵀW)·W_oᵀ, or (``scores="cosine"``) its cosine with each readout row."""
        h = self.features(features)
        if self.settings.scores == "cosine":
            return F.normalize(h, dim=1) @ F.normalize(self.readout, dim=1).T
        return h @ self.readout.T

    @torch.inference_mode()
    def predict(self, request: PredictRequest) -> Prediction:
        return _prediction(self, self.class_scores(_frozen(self, request)), request)

    def state_dict(self) -> dict[str, Any]:
        """W_o (K×M, small beside G), the projection's seed and the per-task records."""
        return {"readout": self.readout.clone(), "projection_seed": self.projection_seed,
                "tasks": [dict(record) for record in self.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["projection_seed"] != self.projection_seed:
            raise ValueError("the checkpoint's random projection was drawn from another seed: resume with the run's "
                             "own seed")
        if tuple(state["readout"].shape) != tuple(self.readout.shape):
            raise ValueError(f"the checkpoint's readout has shape {tuple(state['readout'].shape)}, these settings "
                             f"need {tuple(self.readout.shape)}: resume with the run's own settings")
        self.readout = state["readout"].to(self.dtype).clone()
        self.tasks = [dict(record) for record in state["tasks"]]

    def heavy_state_dict(self) -> dict[str, Any]:
        """W as drawn, and G (packed upper triangle) and Q in their accumulation dtype."""
        return {"ranpac_projection": self.features.weight, "ranpac_statistics": self.statistics.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.features.load(state["ranpac_projection"])
            self.statistics.load_state_dict(state["ranpac_statistics"])

    def compat(self) -> dict[str, Any]:
        return {"scores": self.settings.scores, "official_float32": self.settings.official_float32}

    def run_record(self) -> dict[str, Any]:
        """The projection's seed and width, the statistics' dtype and, per task, λ and its errors (and the seconds
        each step took, for the tasks this process ran: they are not part of the state)."""
        tasks = [{**record, **({"seconds": self.seconds[record["task"]]} if record["task"] in self.seconds else {})}
                 for record in self.tasks]
        return {"ranpac": {"projection_seed": self.projection_seed, "projection_dim": self.features.dim,
                           "statistics_dtype": str(self.dtype).removeprefix("torch."), "tasks": tasks}}

    @classmethod
    def summary(cls, settings: RanPACSettings) -> str:
        ridge = (f"λ {settings.ridge_lambda:g}" if settings.ridge_lambda is not None
                 else f"λ per task from {len(settings.lambdas)} candidates")
        return f"M {settings.projection_dim}, {ridge}, {settings.scores} scores"
