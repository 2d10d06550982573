"""Per-class Gaussian statistics of features and the sampler task-adaptive prediction (TAP) trains on.

As the official code: mean and unbiased covariance per class plus 1e-4·I. Unlike it, the Cholesky
factor is computed once per class in float64 (NORGA_SPEC P15), with more jitter only if needed (recorded).
``diagonal``: each dimension's population variance plus the jitter instead (VQ-Prompt's and SMoPE's
classifier alignment), sampled without a factorisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

JITTER = 1e-4


class ClassGaussians:
    """Mean, covariance and cached Cholesky factor of each class's features (``diagonal``: the variances, each
    dimension's standard deviation as the factor; covariances and factors are then vectors)."""

    def __init__(self, shrinkage: float = 0.0, jitter: float = JITTER, diagonal: bool = False) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage, self.jitter, self.diagonal = shrinkage, jitter, diagonal
        self._mean: dict[int, Tensor] = {}
        self._cov: dict[int, Tensor] = {}
        self._factor: dict[int, Tensor] = {}
        self.extra_jitter: dict[int, float] = {}  # classes whose covariance needed more than `jitter`

    def __contains__(self, label: int) -> bool:
        return int(label) in self._mean

    @property
    def labels(self) -> list[int]:
        return sorted(self._mean)

    def add_class(self, label: int, features: Tensor) -> None:
        """Fit the Gaussian of class `label` from its features (n, dim), n >= 2."""
        features = features.detach().to("cpu", torch.float64)
        if features.dim() != 2 or len(features) < 2:
            raise ValueError(f"class {label}: need at least 2 feature vectors shaped (n, dim), got {tuple(features.shape)}")
        label = int(label)
        if self.diagonal:
            variance = features.var(dim=0, unbiased=False) + self.jitter
            self._mean[label] = features.mean(dim=0).float()
            self._cov[label] = variance.float()
            self._factor[label] = variance.sqrt()
            return
        dim = features.shape[1]
        cov = torch.cov(features.T)
        if self.shrinkage:
            cov = (1 - self.shrinkage) * cov + self.shrinkage * cov.diagonal().mean() * torch.eye(dim, dtype=cov.dtype)
        cov = cov + self.jitter * torch.eye(dim, dtype=cov.dtype)
        self._mean[label] = features.mean(dim=0).float()
        self._cov[label] = cov.float()
        self._factor[label] = self._cholesky(label, cov)

    def add_classes(self, features: Tensor, labels: Tensor, classes: Sequence[int]) -> None:
        """Fit the Gaussian of each class of `classes` from the rows of `features` whose label it is."""
        for label in classes:
            self.add_class(label, features[labels == label])

    def _cholesky(self, label: int, cov: Tensor) -> Tensor:
        extra = 0.0
        eye = torch.eye(len(cov), dtype=cov.dtype)
        for _ in range(8):
            factor, info = torch.linalg.cholesky_ex(cov + extra * eye)
            if int(info) == 0:
                if extra:
                    self.extra_jitter[label] = extra
                return factor
            extra = max(extra * 10, self.jitter)
        raise ValueError(f"class {label}: covariance is not positive definite even with {extra} extra jitter")

    def mean(self, label: int) -> Tensor:
        return self._mean[int(label)]

    def covariance(self, label: int) -> Tensor:
        return self._cov[int(label)]

    def means(self, labels: Sequence[int]) -> Tensor:
        """Stacked means (len(labels), dim)."""
        return torch.stack([self._mean[int(label)] for label in labels])

    def sample(self, labels: Sequence[int], n_per_class: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`n_per_class` draws from each class's Gaussian, grouped by class: (features float32, labels)."""
        draws, targets = [], []
        for label in labels:
            factor = self._factor[int(label)]
            noise = torch.randn(n_per_class, factor.shape[0], generator=generator, dtype=torch.float64)
            spread = noise * factor if self.diagonal else noise @ factor.T
            draws.append((self._mean[int(label)].double() + spread).float())
            targets.append(torch.full((n_per_class,), int(label), dtype=torch.long))
        return torch.cat(draws), torch.cat(targets)

    def state_dict(self) -> dict:
        labels = self.labels
        return {
            "labels": torch.tensor(labels, dtype=torch.long),
            "means": torch.stack([self._mean[c] for c in labels]) if labels else torch.empty(0),
            "covariances": torch.stack([self._cov[c] for c in labels]) if labels else torch.empty(0),
            "factors": torch.stack([self._factor[c] for c in labels]) if labels else torch.empty(0),
            "shrinkage": self.shrinkage,
            "jitter": self.jitter,
            "diagonal": self.diagonal,
        }

    def load_state_dict(self, state: dict) -> None:
        self.shrinkage, self.jitter = float(state["shrinkage"]), float(state["jitter"])
        self.diagonal = bool(state.get("diagonal", False))  # files written before the option are full
        labels = state["labels"].tolist()
        self._mean = {c: state["means"][i] for i, c in enumerate(labels)}
        self._cov = {c: state["covariances"][i] for i, c in enumerate(labels)}
        self._factor = {c: state["factors"][i] for i, c in enumerate(labels)}


def official_tap_batches(
    gaussians: ClassGaussians, seen_classes: Sequence[int], num_chunks: int, n_per_class: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One TAP epoch as the official code samples it (NORGA_SPEC P16).

    Draw `n_per_class` samples for every seen class, shuffle them together, then yield only the first
    `num_chunks` consecutive chunks of `n_per_class` samples (officially ``num_chunks = |C_<t|``, so a
    fraction of the draws is never used). Pass ``num_chunks = len(seen_classes)`` to use them all.
    """
    features, labels = gaussians.sample(seen_classes, n_per_class, generator)
    order = torch.randperm(len(labels), generator=generator)
    features, labels = features[order], labels[order]
    for chunk in range(min(num_chunks, len(seen_classes))):
        window = slice(chunk * n_per_class, (chunk + 1) * n_per_class)
        yield features[window], labels[window]
