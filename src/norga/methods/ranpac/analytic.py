"""RanPAC's closed form: a seeded random feature map h = ReLU(xᵀW), the sufficient statistics G = Σ h hᵀ and
Q = Σ h yᵀ accumulated in float64, and the ridge readout W_o = ((G + λI)⁻¹Q)ᵀ by one Cholesky solve.

G and Q are sums, so they do not depend on the order of samples, tasks or chunks (up to float64 rounding); G is
kept exactly symmetric (its lower triangle mirrors the upper one) so that its packed upper triangle is a
lossless checkpoint. At most three M×M matrices are alive at once: G, and G + λI with its factor in place.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger("norga")

#: Rows of features projected at once: bounds the N×M matrix H to CHUNK_ROWS×M.
CHUNK_ROWS = 2048
#: Columns of G mirrored at once (`mirror_upper`).
MIRROR_BLOCK = 1024


class RandomFeatureMap:
    """x -> ReLU(xᵀW) with W (in_features × dim) drawn once, i.i.d. N(0, 1) (no scaling), from its own seeded
    generator; ``dim=0`` is no projection (the "No RPs" ablation): h = x, no ReLU. Computed in `dtype`."""

    def __init__(self, in_features: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> None:
        self.in_features, self.seed, self.dtype = in_features, seed, dtype
        self.weight: Tensor | None = None  # float32, as drawn (stored so no torch version can change it)
        if dim:
            self.weight = torch.randn(in_features, dim, generator=torch.Generator().manual_seed(seed))
        self._compute = None if self.weight is None else self.weight.to(dtype)

    @property
    def dim(self) -> int:
        """M: the width of h (the feature width without projection)."""
        return self.in_features if self.weight is None else self.weight.shape[1]

    def __call__(self, features: Tensor, columns: slice = slice(None)) -> Tensor:
        """h (or its `columns`) of each row of `features`."""
        x = features.to(self.dtype)
        if self._compute is None:
            return x[:, columns]
        return (x @ self._compute[:, columns]).clamp_min_(0)

    def load(self, weight: Tensor | None) -> None:
        """Restore W from a checkpoint (shape checked)."""
        expected = None if self.weight is None else tuple(self.weight.shape)
        found = None if weight is None else tuple(weight.shape)
        if expected != found:
            raise ValueError(f"the checkpoint's random projection has shape {found}, these settings draw {expected}: "
                             "resume with the run's own ranpac.projection_dim and backbone")
        if weight is not None:
            self.weight = weight.to(torch.float32).clone()
            self._compute = self.weight.to(self.dtype)


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)


class RidgeStatistics:
    """G (M×M) and Q (M×K) summed over every sample seen, in `dtype` (float64 by default)."""

    def __init__(self, dim: int, num_classes: int, dtype: torch.dtype = torch.float64) -> None:
        self.gram = torch.zeros(dim, dim, dtype=dtype)
        self.targets = torch.zeros(dim, num_classes, dtype=dtype)
        self.count = 0

    def add(self, feature_map: RandomFeatureMap, features: Tensor, labels: Tensor,
            chunk_rows: int | None = None) -> None:
        """Add Σ h hᵀ and Σ h yᵀ of these samples, `chunk_rows` rows of h at a time; G stays symmetric."""
        rows = chunk_rows or CHUNK_ROWS
        for start in range(0, len(labels), rows):
            h = feature_map(features[start : start + rows])
            self.gram.addmm_(h.T, h)
            self.targets.addmm_(h.T, one_hot(labels[start : start + rows], self.targets.shape[1], h.dtype))
        mirror_upper(self.gram)
        self.count += len(labels)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"gram_upper": pack_upper(self.gram), "targets": self.targets.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        dim = self.gram.shape[0]
        if tuple(state["targets"].shape) != tuple(self.targets.shape) or state["gram_upper"].numel() != dim * (dim + 1) // 2:
            raise ValueError(f"the checkpoint's ridge statistics have Q of shape {tuple(state['targets'].shape)}, these "
                             f"settings need {tuple(self.targets.shape)}: resume with the run's own settings")
        self.gram = unpack_upper(state["gram_upper"].to(self.gram.dtype), dim)
        self.targets = state["targets"].to(self.targets.dtype).clone()
        self.count = int(state["count"])


def mirror_upper(matrix: Tensor) -> None:
    """Copy the upper triangle of square `matrix` onto its lower one, in place, a block of columns at a time."""
    size = matrix.shape[0]
    for start in range(0, size, MIRROR_BLOCK):
        stop = min(start + MIRROR_BLOCK, size)
        block = matrix[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T


def pack_upper(matrix: Tensor) -> Tensor:
    """The upper triangle of a square matrix, row after row (half the bytes of the full matrix)."""
    return torch.cat([matrix[row, row:] for row in range(matrix.shape[0])]) if matrix.numel() else matrix.flatten()


def unpack_upper(packed: Tensor, size: int) -> Tensor:
    """The symmetric matrix whose `pack_upper` is `packed`."""
    matrix = torch.empty(size, size, dtype=packed.dtype)
    offset = 0
    for row in range(size):
        length = size - row
        matrix[row, row:] = packed[offset : offset + length]
        offset += length
    mirror_upper(matrix)
    return matrix


def ridge_readout(gram: Tensor, targets: Tensor, ridge: float, solver: str = "cholesky") -> Tensor:
    """W_o = ((G + λI)⁻¹Q)ᵀ (K×M). ``solver="cholesky"``: G + λI is positive definite for λ > 0, so it is factored
    in place (G is left as it is); where rounding makes the factorisation fail (λ far below G's scale), the LU
    solve is used, with a warning. ``solver="lu"``: the official general solve."""
    system = gram.clone()
    system.diagonal().add_(ridge)
    if solver == "cholesky":
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(system, out=(system, info))  # the factor overwrites G + λI
        if int(info) == 0:
            return torch.cholesky_solve(targets, system).T.contiguous()
        log.warning("ranpac: G + %g I is not positive definite in %s (leading minor %d): solving by LU", ridge,
                    gram.dtype, int(info))
        system = gram.clone()
        system.diagonal().add_(ridge)
    return torch.linalg.solve(system, targets).T.contiguous()
