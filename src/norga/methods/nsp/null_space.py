"""Null-space projectors of VPT-NSP² from accumulated feature statistics (spec §4, deviations §9).

For a symmetric PSD statistic C (k×k) with eigenvalues λ_0 ≥ … ≥ λ_{k−1}, the "null" directions are the eigenvectors
from an elbow of the spectrum on. Default (the paper): the elbow rule of Eq. 28 read literally and the orthogonal
projector P = U0·U0ᵀ onto those directions (symmetric, idempotent; a step projected by it cannot move the old
features' span). Compat switches (the official code, recorded in the settings):
- ``nullity='adaptive'``: smooth the spectrum (Gaussian, σ = 10) and trim 1.5 % at each end before taking the
  largest second difference when k ≥ 128, and put the elbow eigenvector itself into the null set;
- ``normalize_projection=True``: P / ‖P‖_F = P / √R (symmetric, not idempotent: it shrinks every step);
- η < 1: η·B + (1 − η)·I, which lets (1 − η) of every step through in all directions.
The spectrum comes from a float64 ``eigh`` (descending); the official code takes the SVD of the same PSD matrix,
whose singular values are these eigenvalues up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from norga.config import Fraction
from norga.methods.nsp.statistics import LayerStatistics

NULLITY_RULES = ("paper", "adaptive")
SMOOTHED_MIN_SIZE = 128  # the official rule smooths and trims only spectra at least this long
SMOOTHING_SIGMA = 10.0
TRIMMED_FRACTION = 0.03  # of the second differences, half at each end


@dataclass
class NullSpaceSettings:
    """How statistics become projectors; defaults are the paper's exact projector, ``official()`` the code's."""

    nullity: Literal["paper", "adaptive"] = "paper"  # adaptive: the official smoothed, trimmed cut (§4, §9 #2)
    normalize_projection: bool = False  # official: Frobenius-normalised projector (§4.3)
    eta_affinity: Fraction = 1.0  # η1, blend of B1 (the D×D right projector) with the identity
    eta_aggregation: Fraction = 1.0  # η2, blend of B2 (the M×M left projector) with the identity
    accumulate: Literal["sum", "mean"] = "sum"  # across tasks: add (paper, official) or weight by images
    per_batch_mean: bool = False  # official: each batch adds its Gram / (B·H·N) (§9 #4)
    use_affinity_projection: bool = True  # B1 (Table 3 ablation)
    use_aggregation_projection: bool = True  # B2 (Table 3 ablation)

    @classmethod
    def official(cls, eta: float) -> NullSpaceSettings:
        """The official code's behaviour with η1 = η2 = `eta` (0.97 / 0.95 / 0.94 / 0.95 in its four scripts)."""
        return cls(nullity="adaptive", normalize_projection=True, eta_affinity=eta, eta_aggregation=eta,
                   per_batch_mean=True)


def descending_eigh(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of a symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh(covariance.detach().to(torch.float64))
    return values.flip(0), vectors.flip(1)


def _second_differences(values: np.ndarray) -> np.ndarray:
    """f[i] − 2f[i+1] + f[i+2], i.e. the curvature at the middle index i + 1."""
    return values[:-2] - 2 * values[1:-1] + values[2:]


def paper_null_start(values: Tensor) -> int:
    """First null index by the paper's Eq. 28, R = k − argmax_j (λ_{j−1} − 2λ_j + λ_{j+1}), j = 2 … k−1 (1-based):
    the null set starts right after the elbow."""
    points = values.detach().cpu().to(torch.float64).numpy()
    if points.size < 3:
        raise ValueError(f"the elbow rule needs at least 3 eigenvalues, got {points.size}")
    return int(np.argmax(_second_differences(points))) + 2


def adaptive_null_start(values: Tensor, offset: float = 0.0) -> int:
    """First null index by the official code's adaptive rule (``--null_thres_mode adaptive``).

    For k ≥ 128 the curvature is taken on the spectrum smoothed by a Gaussian (σ = 10, reflecting ends) and
    int(1.5 % · k) values at each end of it are ignored; the elbow is the middle of the largest curvature and the
    null set starts at the last eigenvalue not smaller than the elbow's (so the elbow itself is null). An offset
    in [0, 1) moves the start right by that fraction of the rest, any other offset by int(offset) places.
    """
    points = values.detach().cpu().to(torch.float64).numpy()
    if points.size < 3:
        raise ValueError(f"the elbow rule needs at least 3 eigenvalues, got {points.size}")
    if points.size >= SMOOTHED_MIN_SIZE:
        curvature = _second_differences(scipy.ndimage.gaussian_filter1d(points, sigma=SMOOTHING_SIGMA))
        trim = int(points.size * TRIMMED_FRACTION / 2)
        elbow = int(np.argmax(curvature[trim:curvature.size - trim])) + trim + 1
    else:
        elbow = int(np.argmax(_second_differences(points))) + 1
    start = int(np.flatnonzero(points >= points[elbow]).max())
    if 0 <= offset < 1:
        return min(start + int(offset * (points.size - start)), points.size - 1)
    return max(min(start + int(offset), points.size - 1), 0)


def null_start(values: Tensor, nullity: str = "paper") -> int:
    if nullity == "paper":
        return paper_null_start(values)
    if nullity == "adaptive":
        return adaptive_null_start(values)
    raise ValueError(f"unknown nullity rule {nullity!r}; choose one of {NULLITY_RULES}")


def projector(null_basis: Tensor, normalize: bool = False, eta: float = 1.0) -> Tensor:
    """η·B + (1 − η)·I for B = U0·U0ᵀ (U0: orthonormal null directions as columns), B / ‖B‖_F if `normalize`."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if null_basis.shape[1] == 0:
        raise ValueError("the null space is empty: at least one direction must be null")
    b = null_basis @ null_basis.T
    if normalize:
        b = b / torch.linalg.matrix_norm(b)
    return eta * b + (1.0 - eta) * torch.eye(b.shape[0], dtype=b.dtype, device=b.device)


def null_space_projector(covariance: Tensor, nullity: str = "paper", normalize: bool = False,
                         eta: float = 1.0) -> Tensor:
    """The (float64) projector onto the approximate null space of `covariance`, chosen by the rule `nullity`."""
    values, vectors = descending_eigh(covariance)
    return projector(vectors[:, null_start(values, nullity):], normalize, eta)


def layer_projectors(statistics: LayerStatistics, key_weight: Tensor,
                     settings: NullSpaceSettings) -> tuple[Tensor | None, Tensor | None]:
    """(left, right) = (B2, B1) for one block's prompt (M×D): B2 (M×M) from the prompt-attention statistic, B1 (D×D)
    from the affinity statistic; None where that projection is switched off."""
    left = right = None
    if settings.use_aggregation_projection:
        left = null_space_projector(statistics.aggregation_covariance(), settings.nullity,
                                    settings.normalize_projection, settings.eta_aggregation)
    if settings.use_affinity_projection:
        right = null_space_projector(statistics.affinity_covariance(key_weight), settings.nullity,
                                     settings.normalize_projection, settings.eta_affinity)
    return left, right
