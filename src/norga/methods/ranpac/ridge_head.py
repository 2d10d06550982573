"""RanPAC's head as a component any method can own: a seeded random ReLU feature map, float64 sufficient statistics
G and Q summed over every task, λ chosen per task by the official rule, and the ridge readout W_o by one Cholesky
solve. The ``ranpac`` method scores classes with it; HiDe-Prompt's and NoRGa's task identity (``tii.head ranpac``)
sums its class scores over each task's classes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from norga.config import ConfigError, Count, PositiveFloat, Range
from norga.methods.ranpac.analytic import RandomFeatureMap, RidgeStatistics, one_hot, ridge_readout
from norga.methods.ranpac.ridge_selection import (
    LAMBDA_GRID,
    best_lambda,
    official_errors,
    resolvable_lambdas,
    split_rows,
    validation_errors,
)
from norga.runtime.features import FeatureSet
from norga.runtime.seeding import derive_seed

log = logging.getLogger("norga")


@dataclass
class RidgeSettings:
    """RanPAC's head: random projection width, ridge parameter (fixed or chosen per task), scores."""

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


class RidgeHead:
    """Ridge regression on random ReLU features, exact over tasks: `add_task` sums a task's samples into G and Q,
    chooses λ on them and solves; `class_scores` scores features. `stream` names its seeds (the projection's, and
    each task's λ split), derived from the run `seed`, so two heads of one run draw independent ones."""

    def __init__(self, in_features: int, num_classes: int, settings: RidgeSettings, seed: int, stream: str) -> None:
        self.settings, self.seed, self.stream = settings, seed, stream
        self.dtype = torch.float32 if settings.official_float32 else torch.float64
        self.projection_seed = derive_seed(seed, f"{stream}-projection")
        self.features = RandomFeatureMap(in_features, settings.projection_dim, self.projection_seed, self.dtype)
        self.statistics = RidgeStatistics(self.features.dim, num_classes, self.dtype)
        self.readout = torch.zeros(num_classes, self.features.dim, dtype=self.dtype)  # W_o (K×M)
        self.tasks: list[dict[str, Any]] = []  # per task: λ, its validation errors, the split seed
        self.seconds: dict[int, dict[str, float]] = {}  # per task run in this process: statistics, λ search, solve

    @property
    def num_classes(self) -> int:
        return self.readout.shape[0]

    def add_task(self, task: int, samples: FeatureSet, classes: list[int]) -> None:
        """Add task `task`'s samples (features and labels, all of `classes`) to G and Q, choose λ, solve W_o."""
        started = time.perf_counter()
        self.statistics.add(self.features, samples.features, samples.labels)
        accumulated = time.perf_counter()
        record = self._choose_lambda(task, samples, classes)
        chosen = time.perf_counter()
        solver = "lu" if self.settings.official_float32 else "cholesky"
        self.readout = ridge_readout(self.statistics.gram, self.statistics.targets, record["lambda"], solver)
        solved = time.perf_counter()
        self.seconds[task + 1] = {"statistics": round(accumulated - started, 3),
                                  "lambda_search": round(chosen - accumulated, 3), "solve": round(solved - chosen, 3)}
        self.tasks.append(record)
        log.info("%s task %d: λ %g (statistics %.2f s, λ search %.2f s, solve %.2f s)", self.stream, task + 1,
                 record["lambda"], *self.seconds[task + 1].values())

    def _choose_lambda(self, task: int, samples: FeatureSet, classes: list[int]) -> dict[str, Any]:
        """λ for this task: the fixed one, or the official rule on a split seeded from (seed, task), among the
        candidates the solve resolves in float64 (all of them with the official float32 numerics)."""
        s = self.settings
        if s.ridge_lambda is not None:
            return {"task": task + 1, "lambda": s.ridge_lambda}
        candidates = s.lambdas if s.official_float32 else resolvable_lambdas(s.lambdas, self.statistics.gram)
        if not candidates:
            candidates = [max(s.lambdas)]
            log.warning("%s task %d: every λ candidate is below float64's resolution of G (tr %.3g): using %g",
                        self.stream, task + 1, float(self.statistics.gram.trace()), candidates[0])
        column = torch.full((self.num_classes,), -1, dtype=torch.long)
        column[classes] = torch.arange(len(classes))
        targets = one_hot(column[samples.labels], len(classes), self.dtype)
        split_seed = derive_seed(self.seed, f"{self.stream}-lambda", task)
        split = split_rows(len(samples.labels), s.lambda_fit_fraction, torch.Generator().manual_seed(split_seed))
        errors_of = official_errors if s.official_float32 else validation_errors
        errors = errors_of(self.features, samples.features, targets, split, candidates, self.num_classes)
        by_lambda = dict(zip(candidates, errors.tolist()))
        return {"task": task + 1, "lambda": best_lambda(errors, candidates), "split_seed": split_seed,
                "validation_mse": [by_lambda.get(ridge) for ridge in s.lambdas]}  # None: not resolvable

    def class_scores(self, features: Tensor) -> Tensor:
        """ReLU(xᵀW)·W_oᵀ, or (``scores="cosine"``) its cosine with each readout row."""
        h = self.features(features.cpu())
        if self.settings.scores == "cosine":
            return F.normalize(h, dim=1) @ F.normalize(self.readout, dim=1).T
        return h @ self.readout.T

    # ------------------------------------------------------------------ state
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
        return {"projection": self.features.weight, "statistics": self.statistics.state_dict()}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:
        self.features.load(state["projection"])
        self.statistics.load_state_dict(state["statistics"])

    def record(self) -> dict[str, Any]:
        """The projection's seed and width, the statistics' dtype and, per task, λ and its errors (and the seconds
        each step took, for the tasks this process ran: they are not part of the state)."""
        tasks = [{**record, **({"seconds": self.seconds[record["task"]]} if record["task"] in self.seconds else {})}
                 for record in self.tasks]
        return {"projection_seed": self.projection_seed, "projection_dim": self.features.dim,
                "statistics_dtype": str(self.dtype).removeprefix("torch."), "tasks": tasks}


def ridge_summary(settings: RidgeSettings) -> str:
    ridge = (f"λ {settings.ridge_lambda:g}" if settings.ridge_lambda is not None
             else f"λ per task from {len(settings.lambdas)} candidates")
    return f"M {settings.projection_dim}, {ridge}, {settings.scores} scores"
