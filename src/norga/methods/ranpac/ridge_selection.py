"""The ridge parameter λ, chosen per task as RanPAC does: fit on a random 80 % of the task's samples for every λ
of a grid, keep the λ with the least mean squared error on the other 20 % (the first one on ties).

The official code solves an M×M system per candidate. Here one eigendecomposition serves the whole grid: of
the fit rows' Gram matrix H_fit H_fitᵀ (n_fit × n_fit, the dual form) when there are fewer of them than M, else
of G_fit = H_fitᵀH_fit (M×M, the primal form). With either, the validation predictions for λ are
A·diag(1/(s + λ))·B, the same for every λ but the diagonal. ``official_errors`` is the per-candidate route
(the official float32 numerics, a compat switch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from norga.methods.ranpac.analytic import CHUNK_ROWS, RandomFeatureMap

#: The official grid: 10^-8, 10^-7, ..., 10^8.
LAMBDA_GRID = [10.0**exponent for exponent in range(-8, 9)]
#: λ below RESOLUTION·tr(G) is below what G + λI resolves in float64: G's rounding (≈ eps·‖G‖, and ‖G‖ ≤ tr(G)) would be
#: larger than 10^-4·λ, and the solve returns noise along G's null space (seen on the quickstart: λ 10^-8 won a flat
#: validation curve on a task of 300 samples, and the solve with the accumulated G of rank 1500 < M scored 14 % FA).
RESOLUTION = 1e4 * torch.finfo(torch.float64).eps


class Split(NamedTuple):
    """Rows of a task's samples used to fit, and to validate, each candidate λ."""

    fit: Tensor
    validate: Tensor


def split_rows(count: int, fit_fraction: float, generator: torch.Generator) -> Split:
    """A seeded permutation of `count` rows: the first ⌊fit_fraction·count⌋ fit, the rest validate."""
    if count < 2:
        raise ValueError(f"choosing the ridge parameter needs at least 2 training samples in a task, got {count}: "
                         "fix it with --set ranpac.ridge_lambda=VALUE (no selection)")
    order = torch.randperm(count, generator=generator)
    fit = min(max(int(fit_fraction * count), 1), count - 1)
    return Split(order[:fit], order[fit:])


class SpectralPredictor(NamedTuple):
    """Validation predictions for any λ: ``left · diag(1/(eigenvalues + λ)) · right``."""

    eigenvalues: Tensor  # (r,), clamped at 0 (the Gram matrices are positive semi-definite)
    left: Tensor  # (n_val, r)
    right: Tensor  # (r, K)

    def predict(self, ridge: float) -> Tensor:
        return (self.left / (self.eigenvalues + ridge)) @ self.right


def spectral_predictor(feature_map: RandomFeatureMap, fit_x: Tensor, fit_y: Tensor, val_x: Tensor) -> SpectralPredictor:
    """One eigendecomposition for the whole grid: dual (n_fit < M) or primal. `fit_y` holds the fit rows' targets."""
    dim = feature_map.dim
    if len(fit_x) < dim:  # dual: B_λ = H_fitᵀ(K + λI)⁻¹Y_fit, so H_val B_λ = K_vf U diag(1/(Λ+λ)) Uᵀ Y_fit
        kernel = fit_x.new_zeros(len(fit_x), len(fit_x), dtype=feature_map.dtype)
        cross = fit_x.new_zeros(len(val_x), len(fit_x), dtype=feature_map.dtype)
        block = max(64, CHUNK_ROWS * 4096 // (len(fit_x) + len(val_x)))  # columns of h at once (~64 MB)
        for start in range(0, dim, block):
            columns = slice(start, min(start + block, dim))
            h_fit, h_val = feature_map(fit_x, columns), feature_map(val_x, columns)
            kernel.addmm_(h_fit, h_fit.T)
            cross.addmm_(h_val, h_fit.T)
        eigenvalues, basis = torch.linalg.eigh(kernel)
        return SpectralPredictor(eigenvalues.clamp_min(0), cross @ basis, basis.T @ fit_y)
    gram = torch.zeros(dim, dim, dtype=feature_map.dtype)  # primal: B_λ = V diag(1/(S+λ)) Vᵀ Q_fit
    targets = torch.zeros(dim, fit_y.shape[1], dtype=feature_map.dtype)
    for start in range(0, len(fit_x), CHUNK_ROWS):
        h = feature_map(fit_x[start : start + CHUNK_ROWS])
        gram.addmm_(h.T, h)
        targets.addmm_(h.T, fit_y[start : start + CHUNK_ROWS])
    eigenvalues, basis = torch.linalg.eigh(gram)
    del gram
    left = torch.cat([feature_map(val_x[start : start + CHUNK_ROWS]) @ basis
                      for start in range(0, len(val_x), CHUNK_ROWS)])
    return SpectralPredictor(eigenvalues.clamp_min(0), left, basis.T @ targets)


def validation_errors(feature_map: RandomFeatureMap, features: Tensor, targets: Tensor, split: Split,
                      lambdas: list[float], num_classes: int) -> Tensor:
    """The official criterion per λ: the mean squared error of the validation rows' predictions over all
    `num_classes` target columns (`targets` holds the task's columns; the others are 0 in both)."""
    fit_y = targets[split.fit].to(feature_map.dtype)
    val_y = targets[split.validate].to(feature_map.dtype)
    spectral = spectral_predictor(feature_map, features[split.fit], fit_y, features[split.validate])
    cells = len(split.validate) * num_classes
    return torch.tensor([float((spectral.predict(ridge) - val_y).square().sum()) / cells for ridge in lambdas],
                        dtype=torch.float64)


def official_errors(feature_map: RandomFeatureMap, features: Tensor, targets: Tensor, split: Split,
                    lambdas: list[float], num_classes: int) -> Tensor:
    """The same errors the official way: G_fit, Q_fit and one LU solve of (G_fit + λI) per λ, in the map's dtype."""
    h_fit, h_val = feature_map(features[split.fit]), feature_map(features[split.validate])
    fit_y = targets[split.fit].to(h_fit.dtype)
    val_y = targets[split.validate].to(h_fit.dtype)
    gram, right = h_fit.T @ h_fit, h_fit.T @ fit_y
    identity = torch.eye(gram.shape[0], dtype=gram.dtype)
    cells = len(split.validate) * num_classes
    return torch.tensor([float((h_val @ torch.linalg.solve(gram + ridge * identity, right) - val_y).square().sum())
                         / cells for ridge in lambdas], dtype=torch.float64)


def resolvable_lambdas(lambdas: list[float], gram: Tensor) -> list[float]:
    """The candidates the final solve with `gram` (float64) resolves: λ ≥ RESOLUTION·tr(G)."""
    floor = RESOLUTION * float(gram.diagonal().sum())
    return [ridge for ridge in lambdas if ridge >= floor]


def best_lambda(errors: Tensor, lambdas: list[float]) -> float:
    """The λ of least error; the first (smallest, for an ascending grid) on ties, as ``np.argmin``. A grid whose
    errors are all non-finite (a degenerate task) falls back to the largest λ."""
    finite = torch.where(torch.isfinite(errors), errors, torch.full_like(errors, math.inf))
    if not torch.isfinite(finite).any():
        return max(lambdas)
    return lambdas[int(torch.argmin(finite))]
